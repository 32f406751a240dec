//! The guest's files under `/.microagent/` and the ext4 image (`mkfs.ext4 -d`, e2fsprogs).
//!
//! `/.microagent/init` is a busybox sh script (busybox-static is copied in beside it, so images
//! without a shell work too). It mounts /proc, /sys, /dev (devtmpfs, unless the kernel already
//! did), /dev/pts, /dev/shm, /run (tmpfs), /tmp (tmpfs: a deleted file there is freed memory,
//! zeroed by the guest kernel's init_on_free, not blocks left in the VM's rootfs copy, where a
//! snapshot would keep them) and /run/secrets (tmpfs, mode 0700), then runs
//! `/.microagent/agent` as root with stderr on the console, restarting it if it exits. The image's
//! own files are left as they were; missing mount points and `/dev/console` are added.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::digest::{hash_stream, Algorithm};
use super::spec::RuntimeConfig;
use super::unpack::{privileged, Fixup, Tree};
use super::ImageError;

pub const GUEST_DIR: &str = ".microagent";

const INIT: &str = r#"#!/.microagent/busybox sh
# microagent init (installed by `microagent image`): mounts what the guest agent needs, then runs
# it as root, restarted if it exits, with its stderr on the console.
bb=/.microagent/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
$bb mount -t proc -o nosuid,nodev,noexec proc /proc
$bb mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
$bb grep -q '^[^ ]* /dev ' /proc/mounts || $bb mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
$bb mkdir -p /dev/pts /dev/shm
$bb mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts 2>/dev/null
$bb mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm 2>/dev/null
$bb mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
$bb mount -t tmpfs -o nosuid,nodev,mode=1777 tmp /tmp 2>/dev/null
$bb mkdir -p /run/secrets
$bb mount -t tmpfs -o nosuid,nodev,noexec,mode=0700 secrets /run/secrets
[ -s /etc/hostname ] && $bb hostname -F /etc/hostname
$bb ip link set lo up
# microagent.net=ADDR/PREFIX,GATEWAY,DNS (from `--net user`): the VM's own passt is the router.
for arg in $($bb cat /proc/cmdline); do
    case "$arg" in
    microagent.net=*)
        v=${arg#microagent.net=}
        addr=${v%%,*}; rest=${v#*,}; gw=${rest%%,*}; dns=${rest#*,}
        $bb ip link set eth0 up && $bb ip addr add "$addr" dev eth0 &&
            $bb ip route add default via "$gw" &&
            echo "microagent: eth0 $addr via $gw"
        [ -n "$dns" ] && echo "nameserver $dns" >/etc/resolv.conf 2>/dev/null
        ;;
    esac
done
echo "microagent: init ready"
while :; do
    /.microagent/agent 2>/dev/console
    echo "microagent: the guest agent exited with status $?; restarting" >&2
    $bb sleep 1
done
"#;

/// The host files that go into every image.
pub struct GuestFiles {
    pub agent: PathBuf,
    /// sha256 of the agent followed by the init script.
    pub agent_sha256: String,
    pub busybox: PathBuf,
}

/// Whether `p` is an x86-64 ELF executable without a program interpreter (statically linked).
fn static_x86_64_elf(p: &Path) -> Result<bool, String> {
    let mut f = File::open(p).map_err(|e| e.to_string())?;
    let mut h = [0u8; 64];
    if f.read_exact(&mut h).is_err() || &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return Ok(false);
    }
    if u16::from_le_bytes([h[18], h[19]]) != 62 {
        return Ok(false);
    }
    let phoff = u64::from_le_bytes(h[32..40].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([h[54], h[55]]) as u64;
    let phnum = u16::from_le_bytes([h[56], h[57]]) as u64;
    if phentsize < 4 || phnum > 4096 {
        return Ok(false);
    }
    let mut ph = vec![0u8; (phentsize * phnum) as usize];
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(phoff)).map_err(|e| e.to_string())?;
    if f.read_exact(&mut ph).is_err() {
        return Ok(false);
    }
    const PT_INTERP: u32 = 3;
    Ok(!ph
        .chunks(phentsize as usize)
        .any(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) == PT_INTERP))
}

/// Writes the embedded agent (once per digest) into `dir`, where image builds copy it from.
fn embedded_agent(dir: &Path) -> Result<PathBuf, ImageError> {
    let sha = sha256_hex(guest_agent_embed::AGENT);
    let p = dir.join(format!("agent-{}", &sha[..16]));
    if fs::read(&p).is_ok_and(|b| b == guest_agent_embed::AGENT) {
        return Ok(p);
    }
    snapshot::atomic_file::Options::default()
        .mode(0o755)
        .write(&p, guest_agent_embed::AGENT)
        .map_err(ImageError::io("cannot write", &p))?;
    Ok(p)
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

impl GuestFiles {
    /// The guest agent (`$MICROAGENT_AGENT`, else the one built into this binary, written once
    /// into `cache_dir`) and busybox-static (`$MICROAGENT_BUSYBOX`, else /bin/busybox); both must
    /// be static.
    pub fn locate(cache_dir: &Path) -> Result<GuestFiles, ImageError> {
        let agent = match std::env::var_os("MICROAGENT_AGENT").filter(|v| !v.is_empty()) {
            Some(p) => {
                let p = PathBuf::from(p);
                if !p.is_file() {
                    return Err(ImageError::Host(format!(
                        "MICROAGENT_AGENT={} does not exist",
                        p.display()
                    )));
                }
                p
            }
            None => embedded_agent(cache_dir)?,
        };
        match static_x86_64_elf(&agent) {
            Ok(true) => {}
            Ok(false) => {
                return Err(ImageError::Host(format!(
                "the guest agent {} is not a statically linked x86-64 executable: build it with \
                     RUSTFLAGS=\"-C target-feature=+crt-static\"",
                agent.display()
            )))
            }
            Err(e) => {
                return Err(ImageError::Host(format!(
                    "cannot read the guest agent {}: {e}",
                    agent.display()
                )))
            }
        }
        let busybox = match std::env::var_os("MICROAGENT_BUSYBOX").filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => ["/bin/busybox", "/usr/bin/busybox"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
                .ok_or_else(|| ImageError::Host("busybox was not found: apt-get install busybox-static (or set MICROAGENT_BUSYBOX)".into()))?,
        };
        if !static_x86_64_elf(&busybox).unwrap_or(false) {
            return Err(ImageError::Host(format!(
                "{} is not a statically linked x86-64 busybox: apt-get install busybox-static",
                busybox.display()
            )));
        }
        // The agent and the init script together: a cached image built with another of either
        // is built again.
        let f = File::open(&agent).map_err(ImageError::io("cannot open", &agent))?;
        let (d, _) = hash_stream(f.chain(INIT.as_bytes()), Algorithm::Sha256, u64::MAX - 1)
            .map_err(ImageError::io("cannot read", &agent))?;
        Ok(GuestFiles {
            agent,
            agent_sha256: d.to_string(),
            busybox,
        })
    }
}

/// Owner 0:0 and `mode` for a file this module adds (directly as root, else as a fix-up).
fn own(
    tree: &mut Tree,
    host: &Path,
    image_path: &str,
    fmt: u32,
    mode: u32,
    device: Option<(char, u32, u32)>,
) -> Result<(), ImageError> {
    if privileged() {
        let c = std::ffi::CString::new(host.as_os_str().as_encoded_bytes())
            .map_err(|_| ImageError::Malformed("NUL in path".into()))?;
        // SAFETY: lchown on a NUL-terminated path.
        if unsafe { libc::lchown(c.as_ptr(), 0, 0) } != 0 {
            return Err(ImageError::Io {
                what: "cannot chown",
                path: host.to_path_buf(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    fs::set_permissions(host, fs::Permissions::from_mode(mode))
        .map_err(ImageError::io("cannot chmod", host))?;
    if !privileged() {
        tree.fixups.insert(
            image_path.to_string(),
            Fixup {
                uid: 0,
                gid: 0,
                mode: fmt | mode,
                device,
            },
        );
    }
    Ok(())
}

/// Adds `/.microagent/{agent,busybox,init,config.json}`, mount points and `/dev/console`.
pub fn install_guest(
    rootfs: &Path,
    guest: &GuestFiles,
    runtime: &RuntimeConfig,
    tree: &mut Tree,
) -> Result<(), ImageError> {
    let dir = rootfs.join(GUEST_DIR);
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(&dir).map_err(ImageError::io("cannot remove", &dir))?
        }
        Ok(_) => fs::remove_file(&dir).map_err(ImageError::io("cannot remove", &dir))?,
        Err(_) => {}
    }
    tree.fixups.retain(|k, _| !k.starts_with("/.microagent"));
    fs::create_dir(&dir).map_err(ImageError::io("cannot create", &dir))?;
    own(tree, &dir, "/.microagent", libc::S_IFDIR, 0o755, None)?;
    for (src, name) in [(&guest.agent, "agent"), (&guest.busybox, "busybox")] {
        let dst = dir.join(name);
        fs::copy(src, &dst).map_err(ImageError::io("cannot copy to", &dst))?;
        own(
            tree,
            &dst,
            &format!("/.microagent/{name}"),
            libc::S_IFREG,
            0o755,
            None,
        )?;
    }
    let init = dir.join("init");
    fs::write(&init, INIT).map_err(ImageError::io("cannot write", &init))?;
    own(tree, &init, "/.microagent/init", libc::S_IFREG, 0o755, None)?;
    let cfg = dir.join("config.json");
    let mut bytes =
        serde_json::to_vec_pretty(runtime).map_err(|e| ImageError::Malformed(e.to_string()))?;
    bytes.push(b'\n');
    fs::write(&cfg, bytes).map_err(ImageError::io("cannot write", &cfg))?;
    own(
        tree,
        &cfg,
        "/.microagent/config.json",
        libc::S_IFREG,
        0o644,
        None,
    )?;

    for (name, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
    ] {
        let p = rootfs.join(name);
        if fs::symlink_metadata(&p).is_err() {
            fs::create_dir(&p).map_err(ImageError::io("cannot create", &p))?;
            own(tree, &p, &format!("/{name}"), libc::S_IFDIR, mode, None)?;
        }
    }
    let dev = rootfs.join("dev");
    let console = dev.join("console");
    if fs::symlink_metadata(&dev).is_ok_and(|m| m.is_dir())
        && fs::symlink_metadata(&console).is_err()
    {
        if privileged() {
            let c = std::ffi::CString::new(console.as_os_str().as_encoded_bytes())
                .map_err(|_| ImageError::Malformed("NUL in path".into()))?;
            // SAFETY: mknod on a NUL-terminated path inside the staging tree.
            if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(5, 1)) } != 0 {
                return Err(ImageError::Io {
                    what: "cannot create",
                    path: console,
                    source: std::io::Error::last_os_error(),
                });
            }
            own(tree, &console, "/dev/console", libc::S_IFCHR, 0o600, None)?;
        } else {
            File::create(&console).map_err(ImageError::io("cannot create", &console))?;
            own(
                tree,
                &console,
                "/dev/console",
                libc::S_IFCHR,
                0o600,
                Some(('c', 5, 1)),
            )?;
        }
    }
    tree.measure()
}

/// Finds a tool in PATH or the sbin directories (where e2fsprogs lives).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/local/sbin", "/usr/sbin", "/sbin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub struct Built {
    pub size: u64,
}

/// Makes the ext4 image: content plus `headroom_mib` free, then applies the fix-ups.
pub fn build(
    rootfs: &Path,
    out: &Path,
    headroom_mib: u64,
    tree: &Tree,
) -> Result<Built, ImageError> {
    let mkfs = find_tool("mkfs.ext4").ok_or_else(|| {
        ImageError::Host("mkfs.ext4 was not found: apt-get install e2fsprogs".into())
    })?;
    const MIB: u64 = 1 << 20;
    let headroom = headroom_mib * MIB;
    // Inodes: what the tree has, plus one per 16 KiB of headroom, plus slack.
    let inodes =
        (tree.inodes + tree.inodes / 10 + headroom / 16384 + 1024).min(u32::MAX as u64 / 2);
    let mut data = tree.block_bytes + tree.block_bytes / 20;
    let mut last_err = String::new();
    for _attempt in 0..4 {
        let base = data + inodes * 256 + 16 * MIB;
        let journal = (base + headroom) / 64;
        let size = (base + journal.clamp(4 * MIB, 256 * MIB) + headroom).div_ceil(MIB) * MIB;
        let _ = fs::remove_file(out);
        let output = Command::new(&mkfs)
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-I",
                "256",
                "-m",
                "0",
                "-L",
                "microagent-root",
            ])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-E")
            // The file is new and sparse, so the journal already reads as zeros; inode tables
            // stay uninitialised (the guest mounts with noinit_itable, see KERNEL_ARGS).
            .arg(format!(
                "root_owner={}:{},lazy_journal_init=1,lazy_itable_init=1",
                tree.root_owner.0, tree.root_owner.1
            ))
            .arg("-d")
            .arg(rootfs)
            .arg(out)
            .arg(format!("{}k", size / 1024))
            .env("LC_ALL", "C")
            .output()
            .map_err(|e| ImageError::Host(format!("cannot run {}: {e}", mkfs.display())))?;
        if output.status.success() {
            apply_fixups(out, tree)?;
            return Ok(Built { size });
        }
        last_err = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let full = ["Could not allocate", "No space left", "__populate_fs"]
            .iter()
            .any(|s| last_err.contains(s));
        if !full {
            break;
        }
        data = data * 3 / 2 + 64 * MIB;
    }
    let _ = fs::remove_file(out);
    Err(ImageError::Tool {
        tool: "mkfs.ext4 -d".into(),
        message: last_err.lines().last().unwrap_or("no output").to_string(),
    })
}

/// Quotes an image path for debugfs; names it cannot express are refused.
fn quote(p: &str) -> Result<String, ImageError> {
    if p.contains(['"', '\n', '\r']) {
        return Err(ImageError::Unsupported(format!(
            "file name {p:?} cannot be given owners without root; build as root"
        )));
    }
    Ok(format!("\"{p}\""))
}

/// Owners, modes and device nodes the staging tree could not hold (unprivileged builds).
fn apply_fixups(image: &Path, tree: &Tree) -> Result<(), ImageError> {
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut cmds = String::new();
    for (path, f) in &tree.fixups {
        let q = quote(path)?;
        if let Some((kind, major, minor)) = f.device {
            // debugfs makes a node in its current directory, by a plain name.
            let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
            let parent = if parent.is_empty() { "/" } else { parent };
            cmds.push_str(&format!(
                "rm {q}\ncd {}\nmknod {} {kind} {major} {minor}\ncd /\n",
                quote(parent)?,
                quote(name)?
            ));
        }
        let staged_mode_differs = f.device.is_some() || {
            let keep = if f.mode & libc::S_IFMT == libc::S_IFDIR {
                0o700
            } else {
                0o600
            };
            f.mode & keep != keep
        };
        if staged_mode_differs {
            cmds.push_str(&format!("sif {q} mode 0{:o}\n", f.mode));
        }
        if f.uid != uid || f.device.is_some() {
            cmds.push_str(&format!("sif {q} uid {}\n", f.uid));
        }
        if f.gid != gid || f.device.is_some() {
            cmds.push_str(&format!("sif {q} gid {}\n", f.gid));
        }
    }
    if tree.root_mode != 0o755 {
        cmds.push_str(&format!(
            "sif / mode 0{:o}\n",
            libc::S_IFDIR | tree.root_mode
        ));
    }
    if cmds.is_empty() {
        return Ok(());
    }
    let debugfs = find_tool("debugfs").ok_or_else(|| {
        ImageError::Host("debugfs was not found: apt-get install e2fsprogs".into())
    })?;
    let script = image.with_extension("debugfs");
    fs::write(&script, &cmds).map_err(ImageError::io("cannot write", &script))?;
    let output = Command::new(&debugfs)
        .arg("-w")
        .arg("-f")
        .arg(&script)
        .arg(image)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| ImageError::Host(format!("cannot run {}: {e}", debugfs.display())));
    let _ = fs::remove_file(&script);
    let output = output?;
    let errors: Vec<String> = String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .map(str::to_string)
        .collect();
    if !output.status.success() || !errors.is_empty() {
        return Err(ImageError::Tool {
            tool: "debugfs".into(),
            message: errors
                .first()
                .cloned()
                .unwrap_or_else(|| format!("exit status {}", output.status)),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_checks() {
        // This test binary is dynamically linked; busybox-static (when installed) is not.
        let me = std::env::current_exe().unwrap();
        assert!(!static_x86_64_elf(&me).unwrap());
        assert!(!static_x86_64_elf(Path::new("/etc/hostname")).unwrap_or(false));
        if Path::new("/bin/busybox").exists() {
            assert!(static_x86_64_elf(Path::new("/bin/busybox")).unwrap());
        }
    }

    #[test]
    fn debugfs_quoting() {
        assert_eq!(quote("/a b").unwrap(), "\"/a b\"");
        assert!(quote("/a\"b").is_err());
        assert!(quote("/a\nb").is_err());
    }
}
