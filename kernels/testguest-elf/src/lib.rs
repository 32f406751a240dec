//! The bare-metal test guest's ELF image. `build.rs` compiles `kernels/testguest` for
//! `x86_64-unknown-none`; the CLI embeds it as `builtin:testguest` and tests boot it directly.

/// The test guest, a PVH-capable x86_64 ELF booted through the Linux 64-bit entry.
pub static ELF: &[u8] = include_bytes!(env!("MICROAGENT_TESTGUEST_ELF"));
