//! Filesystem freezing: which mounts to freeze (from `/proc/self/mountinfo`), and FIFREEZE/FITHAW.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `_IOWR('X', 119, int)`: freeze the filesystem the descriptor is on.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`: thaw it.
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Filesystem types that hold no data worth freezing (or cannot be frozen).
const PSEUDO_FILESYSTEMS: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "tmpfs",
    "ramfs",
    "devpts",
    "mqueue",
    "hugetlbfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "autofs",
    "efivarfs",
    "nsfs",
    "rpc_pipefs",
    "selinuxfs",
];

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the filesystem (mounts of one filesystem share it).
    pub device: String,
    /// Where it is mounted (octal escapes decoded).
    pub mount_point: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mounted read-only (per mount or per superblock).
    pub read_only: bool,
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // id parent major:minor root mount_point options [optional fields...] - fstype source super_options
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let right: Vec<&str> = right.split(' ').collect();
    if left.len() < 6 || right.len() < 3 {
        return None;
    }
    let has_ro = |opts: &str| opts.split(',').any(|o| o == "ro");
    Some(MountEntry {
        device: left[2].to_owned(),
        mount_point: PathBuf::from(unescape(left[4])),
        fstype: right[0].to_owned(),
        read_only: has_ro(left[5]) || has_ro(right[2]),
    })
}

/// Decodes the `\ooo` octal escapes the kernel uses for space, tab, newline and backslash.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a mount is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// The mount.
    pub entry: MountEntry,
    /// Why.
    pub reason: String,
}

/// The mounts to freeze, in freezing order (reverse mount order, `/` last; one mount per
/// filesystem), and the ones skipped. With `only`, mounts outside that list are ignored entirely.
pub fn plan(entries: &[MountEntry], only: Option<&[PathBuf]>) -> (Vec<MountEntry>, Vec<Skip>) {
    let mut chosen = Vec::new();
    let mut skipped = Vec::new();
    let mut devices = HashSet::new();
    for entry in entries.iter().rev() {
        if let Some(only) = only {
            if !only.iter().any(|p| p == &entry.mount_point) {
                continue;
            }
        }
        let reason = if PSEUDO_FILESYSTEMS.contains(&entry.fstype.as_str()) {
            Some("pseudo filesystem".to_owned())
        } else if entry.read_only {
            Some("read-only".to_owned())
        } else if !devices.insert(entry.device.clone()) {
            Some(format!("filesystem {} already chosen", entry.device))
        } else {
            None
        };
        match reason {
            Some(reason) => skipped.push(Skip {
                entry: entry.clone(),
                reason,
            }),
            None => chosen.push(entry.clone()),
        }
    }
    // Reverse mount order already puts `/` (the first mount) near the end; make sure it is last.
    chosen.sort_by_key(|e| e.mount_point == Path::new("/"));
    (chosen, skipped)
}

/// Reads the mount table and plans (see [`plan`]).
pub fn plan_from(
    mountinfo: &Path,
    only: Option<&[PathBuf]>,
) -> io::Result<(Vec<MountEntry>, Vec<Skip>)> {
    let text = std::fs::read_to_string(mountinfo)?;
    // Mount points appear resolved in the table: resolve the caller's list the same way.
    let only: Option<Vec<PathBuf>> = only.map(|paths| {
        paths
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
            .collect()
    });
    Ok(plan(&parse_mountinfo(&text), only.as_deref()))
}

fn ioctl_on(mount_point: &Path, request: libc::c_ulong) -> io::Result<()> {
    let dir = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(mount_point)?;
    // SAFETY: FIFREEZE and FITHAW take an int argument that the kernel ignores.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Freezes the filesystem mounted at `mount_point` (EBUSY: already frozen; EOPNOTSUPP: cannot be).
pub fn freeze(mount_point: &Path) -> io::Result<()> {
    ioctl_on(mount_point, FIFREEZE)
}

/// Thaws it (EINVAL: it was not frozen).
pub fn thaw(mount_point: &Path) -> io::Result<()> {
    ioctl_on(mount_point, FITHAW)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=1k
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
28 27 0:25 / /mnt/ro ro,nosuid - ext4 /dev/vdb ro
29 27 254:16 / /data rw,relatime shared:5 - xfs /dev/vdc rw
30 27 254:16 /sub /mnt/with\\040space rw - xfs /dev/vdc rw
31 27 0:40 / /run/secrets rw - tmpfs tmpfs rw
32 27 254:32 / /srv rw - ext4 /dev/vdd ro
garbage line
";

    #[test]
    fn parses_and_decodes_escapes() {
        let entries = parse_mountinfo(SAMPLE);
        assert_eq!(entries.len(), 8);
        assert_eq!(entries[5].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(entries[4].fstype, "xfs");
        assert!(entries[3].read_only);
        assert!(entries[7].read_only, "superblock ro counts");
        assert!(!entries[2].read_only);
    }

    #[test]
    fn plan_skips_pseudo_readonly_and_duplicates_and_freezes_root_last() {
        let entries = parse_mountinfo(SAMPLE);
        let (chosen, skipped) = plan(&entries, None);
        let points: Vec<_> = chosen.iter().map(|e| e.mount_point.clone()).collect();
        assert_eq!(
            points,
            vec![PathBuf::from("/mnt/with space"), PathBuf::from("/")]
        );
        assert_eq!(skipped.len(), 6);
        let (chosen, skipped) = plan(&entries, Some(&[PathBuf::from("/data")]));
        assert_eq!(chosen.len(), 1);
        assert!(skipped.is_empty());
    }

    #[test]
    fn unescape_handles_edges() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("trail\\04"), "trail\\04");
        assert_eq!(unescape("\\134"), "\\");
        assert_eq!(unescape("\\999"), "\\999");
    }
}
