//! What devices a VM gets, as plain data the CLI can store and hand to the VMM.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Every virtio device of a VM. Slots are assigned in this order: block devices (as listed),
/// net, vsock, rng; a restore must use the same configuration as the boot it continues.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    #[serde(default)]
    pub blocks: Vec<BlockConfig>,
    #[serde(default)]
    pub net: Option<NetConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// A virtio-rng device fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
}

/// A virtio-blk disk backed by a raw image file (or block device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Serial reported by VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[serde(default)]
    pub id: Option<String>,
}

/// A virtio-vsock device whose host side is a Unix socket (Firecracker's hybrid convention).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// Host clients connect here and send `CONNECT <port>\n`; guest connections to host port P
    /// go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// A virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub backend: NetBackendConfig,
    pub mac: MacAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetBackendConfig {
    /// A `passt` process for this VM, spoken to over a socket pair (qemu stream protocol).
    Passt {
        /// The passt binary; `None` looks `passt` up in PATH.
        #[serde(default)]
        binary: Option<PathBuf>,
        /// Extra command-line arguments (port forwards, addresses, ...).
        #[serde(default)]
        args: Vec<String>,
    },
    /// A passt started and supervised outside this process (in the host's network namespace),
    /// listening on this Unix socket; reconnected to if it restarts.
    PasstSocket { path: PathBuf },
    /// An existing or new tap interface.
    Tap { name: String },
}

/// An Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered unicast address derived from `seed` (e.g. a VM name's hash).
    pub fn local_from_seed(seed: u64) -> Self {
        let b = seed.to_le_bytes();
        MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a MAC address (expected six hex bytes separated by ':')")]
pub struct BadMac(pub String);

impl FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let bad = || BadMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() || out[0] & 1 != 0 {
            // Trailing parts, or a multicast address (unusable as a NIC's own).
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parse_and_print() {
        let m: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:12:34:56");
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "zz:54:00:12:34:56",
            "01:00:5e:00:00:01",
            "5:54:00:12:34:56",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn config_is_serde_data() {
        let c = DeviceConfig {
            blocks: vec![BlockConfig {
                path: "/tmp/a.img".into(),
                read_only: true,
                id: Some("root".into()),
            }],
            net: Some(NetConfig {
                backend: NetBackendConfig::Tap {
                    name: "tap0".into(),
                },
                mac: MacAddr::local_from_seed(7),
            }),
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: "/tmp/v.sock".into(),
            }),
            rng: true,
        };
        let back: DeviceConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            serde_json::from_str::<DeviceConfig>("{}").unwrap(),
            DeviceConfig::default()
        );
    }
}
