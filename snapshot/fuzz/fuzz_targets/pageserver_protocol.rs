#![no_main]
//! The page server's wire protocol on hostile frames: what a client VMM sends the server
//! (`Hello` with its memory layout, `StatsRequest`, `Bye`) and what comes back (`Accept`,
//! `Refuse`, `Stats`, `Fatal`).
//!
//! The first input byte: odd means make the length field and CRC right first (mutations then
//! reach the bodies); bit 1 also encodes the rest as the texts of `Fatal`, `Refuse` and a
//! `Hello` label, which must come back cut to their limits.
//!
//! Promised: `decode` accepts only frames exactly as `encode` writes them (so a decoded message
//! encodes back to the same bytes), every frame is at most `MAX_FRAME`; a layout that
//! `validate` accepts is non-empty, bounded, page aligned, without a null host address, without
//! wrapping, inside the memory file and without overlaps.

use libfuzzer_sys::fuzz_target;
use snapshot::pageserver::protocol::{
    Accept, Counters, Hello, Layout, Message, RefuseCode, Region, SessionStats, MAX_FRAME,
    MAX_LABEL, MAX_REASON, MAX_REGIONS,
};

#[path = "seeds.rs"]
mod seeds;

const PAGE: u64 = 4096;

fn hello(n: u64) -> Hello {
    Hello {
        page_size: 4096,
        features: 8,
        label: "vm-1".into(),
        layout: Layout {
            regions: (0..n)
                .map(|i| Region {
                    guest_addr: i << 32,
                    host_addr: 0x7f00_0000_0000 + (i << 30),
                    len: 1 << 20,
                    file_offset: i << 20,
                })
                .collect(),
        },
    }
}

fn seeds() -> Vec<Vec<u8>> {
    [
        Message::Hello(hello(1)),
        Message::Hello(hello(3)),
        Message::Accept(Accept {
            client_id: 7,
            chunk_bytes: 65536,
            prefetch_pages: 12,
            recording: true,
        }),
        Message::Refuse {
            code: RefuseCode::OutsideFile,
            reason: "region 0".into(),
        },
        Message::StatsRequest,
        Message::Stats(SessionStats {
            counters: Counters {
                faults: 1,
                ..Counters::default()
            },
            prefetch_total: 9,
            prefetch_done: true,
        }),
        Message::Fatal("gone".into()),
        Message::Bye,
    ]
    .iter()
    .map(|m| {
        let mut v = vec![0u8];
        v.extend(m.encode());
        v
    })
    .collect()
}

/// `bytes` with its body length and CRC made consistent with its length.
fn fix_up(bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if b.len() >= 16 {
        let body = (b.len() - 16) as u32;
        b[8..12].copy_from_slice(&body.to_le_bytes());
        let end = b.len() - 4;
        let crc = crc32fast::hash(&b[..end]);
        b[end..].copy_from_slice(&crc.to_le_bytes());
    }
    b
}

fn check_layout(l: &Layout, file_len: Option<u64>) {
    if l.validate(file_len).is_err() {
        return;
    }
    assert!(!l.regions.is_empty() && l.regions.len() <= MAX_REGIONS);
    for r in &l.regions {
        assert!(r.len > 0 && r.host_addr != 0);
        assert_eq!(
            (r.guest_addr | r.host_addr | r.len | r.file_offset) % PAGE,
            0
        );
        assert!(r.guest_addr.checked_add(r.len).is_some());
        assert!(r.host_addr.checked_add(r.len).is_some());
        let file_end = r.file_offset.checked_add(r.len).expect("file range wraps");
        if let Some(fl) = file_len {
            assert!(file_end <= fl);
        }
    }
    let disjoint = |a: u64, b: u64, len_a: u64, len_b: u64| a + len_a <= b || b + len_b <= a;
    for (i, a) in l.regions.iter().enumerate() {
        for b in &l.regions[i + 1..] {
            assert!(disjoint(a.host_addr, b.host_addr, a.len, b.len));
            assert!(disjoint(a.guest_addr, b.guest_addr, a.len, b.len));
            assert!(disjoint(a.file_offset, b.file_offset, a.len, b.len));
        }
    }
}

fn check_frame(bytes: &[u8]) {
    match Message::decode(bytes) {
        Ok(m) => {
            assert!(bytes.len() <= MAX_FRAME);
            assert_eq!(
                m.encode(),
                bytes,
                "{m:?} does not encode to the frame it came from"
            );
            if let Message::Hello(h) = &m {
                assert!(h.layout.regions.len() <= MAX_REGIONS && h.label.len() <= MAX_LABEL);
                let file_len = h.features.rotate_left(12) & !(PAGE - 1);
                check_layout(&h.layout, Some(file_len));
                check_layout(&h.layout, None);
            }
        }
        Err(e) => {
            let _ = (e.code().as_str(), e.to_string());
        }
    }
}

/// Messages built from arbitrary text: cut to their limits, on a char boundary, and decoded
/// back as cut.
fn check_texts(rest: &[u8]) {
    let text = String::from_utf8_lossy(rest).into_owned();
    let cut = |max: usize| {
        let mut end = text.len().min(max);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].to_string()
    };
    let code = RefuseCode::from_wire(rest.first().map_or(0, |b| u16::from(*b)));
    for (m, want) in [
        (
            Message::Fatal(text.clone()),
            Message::Fatal(cut(MAX_REASON)),
        ),
        (
            Message::Refuse {
                code,
                reason: text.clone(),
            },
            Message::Refuse {
                code,
                reason: cut(MAX_REASON),
            },
        ),
    ] {
        let f = m.encode();
        assert!(f.len() <= MAX_FRAME);
        assert_eq!(Message::decode(&f), Ok(want));
    }
    let mut h = hello(2);
    h.label = text.clone();
    let f = Message::Hello(h.clone()).encode();
    assert!(f.len() <= MAX_FRAME);
    match Message::decode(&f) {
        Ok(Message::Hello(back)) => {
            h.label = cut(MAX_LABEL);
            assert_eq!(back, h);
        }
        Ok(other) => panic!("a hello decoded as {other:?}"),
        // A label with control characters is refused, never cut into something else.
        Err(_) => assert!(cut(MAX_LABEL).chars().any(char::is_control)),
    }
}

fuzz_target!(
    init: seeds::write_if_empty(seeds),
    |data: &[u8]| {
        let Some((&sel, rest)) = data.split_first() else {
            return;
        };
        if sel & 1 == 1 {
            check_frame(&fix_up(rest));
        } else {
            check_frame(rest);
        }
        if sel & 2 == 2 {
            check_texts(rest);
        }
    }
);
