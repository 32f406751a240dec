#![no_main]
//! `vmstate::validate / version / decode` on hostile bytes, decoding into a struct shaped like the
//! VMM's `VmState` (which lives in the vmm crate, out of this crate's reach): nested structs,
//! fixed arrays, byte vectors, options, enums, maps and a field added later with a default.
//!
//! The first input byte picks what the rest is: 0 the file as it is; 1 the file with its CRC
//! made right; 2 and 3 a payload wrapped in a valid header and CRC as version 2 (CBOR) or 1
//! (postcard), so mutations reach the decoders instead of stopping at the CRC.
//!
//! Promised: `validate` and `version` agree and accept only known versions; `decode` fails
//! whenever `validate` does, with the same error; what decodes encodes again and decodes back to
//! the same state.

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};
use snapshot::vmstate::{self, StateError, OLDEST_STATE_FORMAT_VERSION, STATE_FORMAT_VERSION};

#[path = "seeds.rs"]
mod seeds;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct VmState {
    mem_mib: u64,
    kvm: KvmState,
    vcpus: Vec<VcpuState>,
    devices: Devices,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KvmState {
    clock: u64,
    pit: [u32; 6],
    irqchip: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct VcpuState {
    id: u8,
    regs: [u64; 18],
    msrs: Vec<(u32, u64)>,
    mp_state: Option<u32>,
    events: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Queue {
    Off,
    Ready {
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    },
    Raw(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Devices {
    serial: [u8; 8],
    queues: Vec<Queue>,
    config: BTreeMap<String, i64>,
    #[serde(default)]
    added_later: Option<String>,
}

fn sample(n: u8) -> VmState {
    VmState {
        mem_mib: 512,
        kvm: KvmState {
            clock: 123_456,
            pit: [1, 2, 3, 4, 5, 6],
            irqchip: vec![7; 16],
        },
        vcpus: (0..n)
            .map(|id| VcpuState {
                id,
                regs: [u64::from(id); 18],
                msrs: vec![(0x10, 99), (0xc000_0080, 0xd01)],
                mp_state: Some(0),
                events: (id == 0).then(|| vec![1, 2]),
            })
            .collect(),
        devices: Devices {
            serial: *b"16550ab\0",
            queues: vec![
                Queue::Off,
                Queue::Ready {
                    size: 256,
                    desc: 0x1000,
                    avail: 0x2000,
                    used: 0x3000,
                },
                Queue::Raw(vec![0xff; 3]),
            ],
            config: [("mac".to_string(), -1i64)].into_iter().collect(),
            added_later: Some("x".into()),
        },
    }
}

fn wrap(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 24);
    f.extend_from_slice(&vmstate::MAGIC);
    f.extend_from_slice(&version.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    f.extend_from_slice(payload);
    let crc = crc32fast::hash(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for n in [0u8, 1, 2] {
        let mut v = vec![0u8];
        v.extend(vmstate::encode(&sample(n)).unwrap());
        out.push(v);
        let file = vmstate::encode(&sample(n)).unwrap();
        let mut v = vec![2u8];
        v.extend_from_slice(&file[20..file.len() - 4]);
        out.push(v);
        let mut v = vec![3u8];
        v.extend(postcard::to_allocvec(&sample(n)).unwrap());
        out.push(v);
    }
    out
}

fuzz_target!(
    init: seeds::write_if_empty(seeds),
    |data: &[u8]| {
        let Some((&sel, rest)) = data.split_first() else {
            return;
        };
        let bytes = match sel % 4 {
            0 => rest.to_vec(),
            1 => {
                let mut b = rest.to_vec();
                if b.len() >= 4 {
                    let end = b.len() - 4;
                    let crc = crc32fast::hash(&b[..end]);
                    b[end..].copy_from_slice(&crc.to_le_bytes());
                }
                b
            }
            2 => wrap(STATE_FORMAT_VERSION, rest),
            _ => wrap(1, rest),
        };
        let valid = vmstate::validate(&bytes);
        let version = vmstate::version(&bytes);
        assert_eq!(valid.is_ok(), version.is_ok());
        if let Ok(v) = version {
            assert!((OLDEST_STATE_FORMAT_VERSION..=STATE_FORMAT_VERSION).contains(&v));
        }
        let decoded = vmstate::decode::<VmState>(&bytes);
        match (&valid, &decoded) {
            (Err(e), Err(d)) => assert_eq!(e, d),
            (Err(e), Ok(_)) => panic!("decoded a file validate refuses: {e}"),
            (Ok(()), Err(StateError::Decode { version: v, .. })) => {
                assert_eq!(Ok(*v), version)
            }
            (Ok(()), Err(e)) => panic!("a valid file fails to decode with {e}"),
            (Ok(()), Ok(_)) => {}
        }
        if let Ok(state) = decoded {
            let again = vmstate::encode(&state).expect("a decoded state encodes");
            assert_eq!(vmstate::version(&again), Ok(STATE_FORMAT_VERSION));
            assert_eq!(vmstate::decode::<VmState>(&again), Ok(state));
        }
    }
);
