use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::component_state::Persist;
use crate::devices::config::BlockConfig;
use crate::devices::virtio::chain::tests::mem;
use crate::devices::virtio::testutil::TestQueue;
use crate::devices::virtio::{ActiveQueues, Interrupt, VirtioDevice, COMMON_FEATURES};
use crate::memory::GuestMemory;

pub(crate) struct TempImage(pub PathBuf);
impl TempImage {
    pub fn new(tag: &str, len: usize) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "vmm-blk-{tag}-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
        std::fs::write(&p, data).unwrap();
        Self(p)
    }
}
impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x1f_0000;

fn header(m: &GuestMemory, kind: u32, sector: u64) {
    m.write_obj(kind, GuestAddress(HDR)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

fn status(m: &GuestMemory) -> u8 {
    m.read_obj(GuestAddress(STATUS)).unwrap()
}

fn activate(b: &mut Block, m: &GuestMemory, q: &TestQueue) -> Arc<Interrupt> {
    let irq = Arc::new(Interrupt::new().unwrap());
    b.activate(ActiveQueues {
        mem: m.clone(),
        acked_features: COMMON_FEATURES,
        queues: vec![q.queue()],
        interrupt: irq.clone(),
    })
    .unwrap();
    irq
}

#[test]
fn read_write_flush_get_id_round_trip() {
    let img = TempImage::new("rw", 64 * 1024);
    let m = mem();
    let mut q = TestQueue::new(&m, 0, 16);
    let mut b = Block::new(&img.0, false, Some("disk-0")).unwrap();
    assert_eq!(b.capacity_sectors(), 128);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);
    let irq = activate(&mut b, &m, &q);

    // Read sectors 2..4 into two buffers.
    header(&m, VIRTIO_BLK_T_IN, 2);
    q.push(&[
        (HDR, 16, false),
        (DATA, 512, true),
        (DATA + 0x1000, 512, true),
        (STATUS, 1, true),
    ]);
    assert!(b.process_queue());
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(q.used(0), (0, 1025));
    let file = std::fs::read(&img.0).unwrap();
    let mut got = vec![0u8; 512];
    m.read_slice(&mut got, GuestAddress(DATA + 0x1000)).unwrap();
    assert_eq!(got, &file[3 * 512..4 * 512]);
    assert_eq!(irq.status(), 1);

    // Write sector 127 (the last one), then flush.
    m.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    header(&m, VIRTIO_BLK_T_OUT, 127);
    q.push(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    b.process_queue();
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(q.used(1).1, 1);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    q.push(&[(HDR, 16, false), (STATUS, 1, true)]);
    b.process_queue();
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    let mut f = std::fs::File::open(&img.0).unwrap();
    f.seek(SeekFrom::Start(127 * 512)).unwrap();
    let mut tail = vec![0u8; 512];
    f.read_exact(&mut tail).unwrap();
    assert_eq!(tail, vec![0xab; 512]);

    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    q.push(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    b.process_queue();
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..7], b"disk-0\0");
    assert_eq!(q.used(3).1, 21);
}

#[test]
fn read_only_disk_refuses_writes() {
    let img = TempImage::new("ro", 4096);
    let m = mem();
    let mut q = TestQueue::new(&m, 0, 16);
    let mut b = Block::new(&img.0, true, None).unwrap();
    assert_ne!(b.avail_features() & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(b.avail_features() & 1 << VIRTIO_BLK_F_DISCARD, 0);
    activate(&mut b, &m, &q);
    for kind in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        header(&m, kind, 0);
        m.write_slice(&[0u8; 16], GuestAddress(HDR + 16)).unwrap();
        let len = if kind == VIRTIO_BLK_T_OUT { 512 } else { 16 };
        q.push(&[(HDR, 16 + len, false), (STATUS, 1, true)]);
        b.process_queue();
        assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8, "type {kind}");
    }
    // Reads and flushes still work.
    header(&m, VIRTIO_BLK_T_IN, 0);
    q.push(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    b.process_queue();
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(std::fs::read(&img.0).unwrap(), TempImage_data(4096));
}

#[allow(non_snake_case)]
fn TempImage_data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 512) as u8 ^ (i as u8)).collect()
}

#[test]
fn discard_and_write_zeroes_punch_holes() {
    let img = TempImage::new("discard", 64 * 1024);
    let m = mem();
    let mut q = TestQueue::new(&m, 0, 16);
    let mut b = Block::new(&img.0, false, None).unwrap();
    if b.avail_features() & 1 << VIRTIO_BLK_F_DISCARD == 0 {
        eprintln!("skipped: this file system cannot punch holes");
        return;
    }
    let mut cfg = [0u8; 4];
    b.read_config(40, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg), 32, "max_discard_seg");
    activate(&mut b, &m, &q);
    for (kind, sector) in [
        (VIRTIO_BLK_T_DISCARD, 8u64),
        (VIRTIO_BLK_T_WRITE_ZEROES, 32),
    ] {
        header(&m, kind, 0);
        m.write_obj(sector, GuestAddress(HDR + 16)).unwrap();
        m.write_obj(8u32, GuestAddress(HDR + 24)).unwrap();
        m.write_obj(0u32, GuestAddress(HDR + 28)).unwrap();
        q.push(&[(HDR, 32, false), (STATUS, 1, true)]);
        b.process_queue();
        assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
        let f = std::fs::read(&img.0).unwrap();
        let s = sector as usize * 512;
        assert!(f[s..s + 4096].iter().all(|&x| x == 0));
        assert_ne!(f[s - 1], 0);
        assert_eq!(f.len(), 64 * 1024);
    }
}

#[test]
fn hostile_chains_get_an_error_or_nothing_and_no_memory_outside_the_guest() {
    let img = TempImage::new("hostile", 8192);
    let m = mem();
    let mut q = TestQueue::new(&m, 0, 16);
    let mut b = Block::new(&img.0, false, None).unwrap();
    activate(&mut b, &m, &q);
    let before = std::fs::read(&img.0).unwrap();

    // 1. Data buffer outside guest memory: chain refused, used length 0, status untouched.
    header(&m, VIRTIO_BLK_T_IN, 0);
    q.push(&[
        (HDR, 16, false),
        (0x4000_0000, 512, true),
        (STATUS, 1, true),
    ]);
    b.process_queue();
    assert_eq!(q.used(0).1, 0);
    assert_eq!(status(&m), 0xff);

    // 2. Zero-length data descriptor.
    q.push(&[(HDR, 16, false), (DATA, 0, true), (STATUS, 1, true)]);
    b.process_queue();
    assert_eq!(q.used(1).1, 0);

    // 3. Readable status (wrong direction): no status to write.
    q.push(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)]);
    b.process_queue();
    assert_eq!(q.used(2).1, 0);

    // 4. Writable header: reported as an I/O error through the status byte.
    q.push(&[(HDR, 16, true), (STATUS, 1, true)]);
    b.process_queue();
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);

    // 5. Read past the capacity (16 sectors).
    header(&m, VIRTIO_BLK_T_IN, 15);
    q.push(&[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
    b.process_queue();
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);

    // 6. A write whose data is device-writable.
    header(&m, VIRTIO_BLK_T_OUT, 0);
    q.push(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    b.process_queue();
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);

    // 7. A descriptor loop: 5 -> 6 -> 5 ...
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    let at = 12;
    q.push_raw(
        &[
            RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, at + 1)),
            RawDescriptor::from(Descriptor::new(DATA, 512, VRING_DESC_F_NEXT as u16, at)),
        ],
        at,
    );
    b.process_queue();
    assert_eq!(q.used(6).1, 0);

    // 8. Huge length (4 GiB - 1).
    q.push(&[(HDR, 16, false), (DATA, u32::MAX, true), (STATUS, 1, true)]);
    b.process_queue();
    assert_eq!(q.used(7).1, 0);

    // 9. Unknown type: UNSUPP.
    header(&m, 0x1234, 0);
    q.push(&[(HDR, 16, false), (STATUS, 1, true)]);
    b.process_queue();
    assert_eq!(status(&m), VIRTIO_BLK_S_UNSUPP as u8);

    assert_eq!(q.used_idx(), 9);
    assert_eq!(std::fs::read(&img.0).unwrap(), before, "disk changed");
}

#[test]
fn bad_host_input_is_a_clear_error_at_construction() {
    let e = Block::new(std::path::Path::new("/nonexistent/disk.img"), false, None)
        .err()
        .unwrap();
    assert!(matches!(e, BlockError::NotFound(_)), "{e}");
    assert!(e.to_string().contains("/nonexistent/disk.img"));
    let e = Block::new(&std::env::temp_dir(), true, None).err().unwrap();
    assert!(
        matches!(e, BlockError::NotAFile(_) | BlockError::Open { .. }),
        "{e}"
    );
    let img = TempImage::new("id", 512);
    let e = Block::new(&img.0, false, Some("an id much longer than twenty bytes"))
        .err()
        .unwrap();
    assert!(matches!(e, BlockError::IdTooLong(_)));
}

#[test]
fn state_round_trip_checks_capacity() {
    let img = TempImage::new("state", 4096);
    let b = Block::new(&img.0, false, Some("x")).unwrap();
    let s: BlockState =
        serde_json::from_str(&serde_json::to_string(&b.save().unwrap()).unwrap()).unwrap();
    let config = BlockConfig {
        path: img.0.clone(),
        read_only: false,
        id: Some("x".into()),
    };
    let b2 = Block::restore(&config, &s).unwrap();
    assert_eq!(b2.save().unwrap(), s);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&img.0)
        .unwrap()
        .write_all(&[0; 512])
        .unwrap();
    assert!(matches!(
        Block::restore(&config, &s),
        Err(BlockError::CapacityChanged { .. })
    ));
}
