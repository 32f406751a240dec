//! Loading a guest for the Linux 64-bit boot protocol: the kernel image (vmlinux ELF or bzImage),
//! an optional initrd, the command line and `boot_params` with the e820 map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, ZERO_PAGE_START};
use crate::memory::GuestMemory;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry of a bzImage is this far into its protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an x86_64 ELF vmlinux nor a bzImage")]
    UnknownKernelFormat { path: String },
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel { path: String, source: loader::Error },
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd of {size} bytes does not fit in guest memory above the kernel")]
    InitrdTooLarge { size: u64 },
    #[error("cannot read initrd into guest memory: {0}")]
    ReadInitrd(String),
    #[error("command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write {what} into guest memory")]
    Write { what: &'static str },
    #[error("guest memory is too small to boot: {0} MiB")]
    MemoryTooSmall(u64),
}

/// Where the kernel ended up and where to enter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    /// First byte past the loaded image.
    pub end: GuestAddress,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSource<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

fn detect_format(file: &mut File) -> std::io::Result<Option<KernelFormat>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < head.len() {
        let r = file.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    if n >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]])
            == KERNEL_HDR_MAGIC
    {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// Loads everything a 64-bit Linux entry needs into `mem`; returns the entry point.
pub fn load(mem: &GuestMemory, src: &BootSource<'_>) -> Result<LoadedKernel, BootError> {
    let mem_end = mem.last_addr().raw_value() + 1;
    if mem_end < 2 * HIMEM_START {
        return Err(BootError::MemoryTooSmall(mem_end >> 20));
    }
    let path = src.kernel.display().to_string();
    let mut file = File::open(src.kernel).map_err(|source| BootError::OpenKernel {
        path: path.clone(),
        source,
    })?;
    let format = detect_format(&mut file)
        .map_err(|source| BootError::OpenKernel {
            path: path.clone(),
            source,
        })?
        .ok_or_else(|| BootError::UnknownKernelFormat { path: path.clone() })?;
    let himem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        KernelFormat::Elf => loader::Elf::load(mem, None, &mut file, himem),
        KernelFormat::BzImage => loader::BzImage::load(mem, None, &mut file, himem),
    }
    .map_err(|source| BootError::LoadKernel {
        path: path.clone(),
        source,
    })?;
    let entry = match format {
        KernelFormat::Elf => result.kernel_load,
        KernelFormat::BzImage => result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
    };
    let end = result.kernel_load.unchecked_add(result.kernel_end);
    let kernel_end = GuestAddress(result.kernel_end.max(end.0));

    write_cmdline(mem, src.cmdline)?;
    let initrd = match src.initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_end)?),
        None => None,
    };
    let params = boot_params_for(mem, src.cmdline.len(), initrd, result.setup_header);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::Write {
            what: "boot_params",
        })?;
    Ok(LoadedKernel {
        entry,
        end: kernel_end,
    })
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| BootError::Write {
            what: "command line",
        })
}

/// Places the initrd page-aligned at the top of low RAM (below the MMIO gap), above the kernel.
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: GuestAddress,
) -> Result<(GuestAddress, u64), BootError> {
    let open_err = |source| BootError::OpenInitrd {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let low = mem
        .iter()
        .next()
        .map(|r| r.start_addr().0 + r.len())
        .unwrap_or(0);
    let start = low
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= kernel_end.0)
        .ok_or(BootError::InitrdTooLarge { size })?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|e| BootError::ReadInitrd(e.to_string()))?;
    Ok((GuestAddress(start), size))
}

/// The e820 map: base memory up to the EBDA, then every RAM region from 1 MiB up.
pub fn e820_map(mem: &GuestMemory) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

fn boot_params_for(
    mem: &GuestMemory,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    params
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory;
    use std::io::Write;

    fn mem(mib: u64) -> GuestMemory {
        let ranges: Vec<_> = memory::ram_ranges(mib << 20)
            .into_iter()
            .map(|(a, l)| (a, l as usize))
            .collect();
        GuestMemory::from_ranges(&ranges).unwrap()
    }

    /// A minimal x86_64 ELF with one PT_LOAD of `code` at physical 0x100000, entry there.
    pub(crate) fn tiny_elf(code: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut f[64..64 + 56];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&0x10_0000u64.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    fn write_tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-boot-{}-{name}", std::process::id()));
        let mut f = File::create(&dir).unwrap();
        f.write_all(bytes).unwrap();
        dir
    }

    #[test]
    fn e820_small_guest() {
        let m = mem(64);
        let map = e820_map(&m);
        let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            got,
            vec![(0, 0x9fc00, 1), (0x10_0000, (64 << 20) - 0x10_0000, 1)]
        );
    }

    #[test]
    fn e820_large_guest_has_high_ram_after_gap() {
        let m = mem(4096);
        let got: Vec<_> = e820_map(&m).iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(
            got,
            vec![
                (0, 0x9fc00),
                (0x10_0000, 0xc000_0000 - 0x10_0000),
                (0x1_0000_0000, (4096u64 << 20) - 0xc000_0000)
            ]
        );
    }

    #[test]
    fn loads_elf_and_writes_boot_params_bytes() {
        let code = [0xf4u8, 0xeb, 0xfd];
        let k = write_tmp("elf", &tiny_elf(&code));
        let initrd = write_tmp("initrd", &[0x5a; 5000]);
        let m = mem(64);
        let loaded = load(
            &m,
            &BootSource {
                kernel: &k,
                initrd: Some(&initrd),
                cmdline: "mode=counter count=5",
            },
        )
        .unwrap();
        assert_eq!(loaded.entry, GuestAddress(0x10_0000));
        let mut got = [0u8; 3];
        m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got, code);

        let zp = |off: u64, n: usize| {
            let mut b = vec![0u8; n];
            m.read_slice(&mut b, GuestAddress(ZERO_PAGE_START + off))
                .unwrap();
            b
        };
        let u32_at = |off| u32::from_le_bytes(zp(off, 4).try_into().unwrap());
        assert_eq!(u32_at(0x228), CMDLINE_START as u32, "cmd_line_ptr");
        assert_eq!(u32_at(0x238), 20, "cmdline_size");
        assert_eq!(u32_at(0x202), KERNEL_HDR_MAGIC);
        assert_eq!(zp(0x1fe, 2), vec![0x55, 0xaa]);
        assert_eq!(zp(0x210, 1), vec![0xff], "type_of_loader");
        assert_eq!(zp(0x1e8, 1), vec![2], "e820_entries");
        let e1 = zp(0x2d0 + 20, 20);
        assert_eq!(u64::from_le_bytes(e1[0..8].try_into().unwrap()), 0x10_0000);
        assert_eq!(u32::from_le_bytes(e1[16..20].try_into().unwrap()), 1);
        let mut cl = [0u8; 21];
        m.read_slice(&mut cl, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cl, b"mode=counter count=5\0");

        let rd_addr = u32_at(0x218) as u64;
        assert_eq!(u32_at(0x21c), 5000, "ramdisk_size");
        assert_eq!(rd_addr % PAGE_SIZE, 0);
        assert_eq!(rd_addr, ((64u64 << 20) - 5000) & !(PAGE_SIZE - 1));
        let b: u8 = m.read_obj(GuestAddress(rd_addr + 4999)).unwrap();
        assert_eq!(b, 0x5a);
        for p in [k, initrd] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn rejects_non_kernel_and_missing_files() {
        let m = mem(16);
        let junk = write_tmp("junk", b"#!/bin/sh\necho not a kernel\n");
        let err = load(
            &m,
            &BootSource {
                kernel: &junk,
                initrd: None,
                cmdline: "",
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, BootError::UnknownKernelFormat { .. }),
            "{err}"
        );
        std::fs::remove_file(junk).unwrap();
        let err = load(
            &m,
            &BootSource {
                kernel: Path::new("/nonexistent/vmlinux"),
                initrd: None,
                cmdline: "",
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::OpenKernel { .. }), "{err}");
    }

    #[test]
    fn rejects_oversized_cmdline_and_initrd() {
        let m = mem(16);
        let k = write_tmp("elf2", &tiny_elf(&[0xf4]));
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let err = load(
            &m,
            &BootSource {
                kernel: &k,
                initrd: None,
                cmdline: &long,
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::CmdlineTooLong { .. }));
        let big = write_tmp("bigrd", &vec![1u8; 17 << 20]);
        let err = load(
            &m,
            &BootSource {
                kernel: &k,
                initrd: Some(&big),
                cmdline: "",
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        for p in [k, big] {
            std::fs::remove_file(p).unwrap();
        }
    }
}
