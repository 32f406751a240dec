//! A Linux guest boots to userspace under microagent and reboots cleanly. Runs with the kernel
//! in `MICROAGENT_TEST_KERNEL` (scripts/test.sh builds the variant this host can run: the
//! test-only one on nested page-table KVM, the production one on hardware KVM).

mod common;
use common::*;
use std::path::PathBuf;
use std::time::Duration;

fn kernel_or_skip(test: &str) -> Option<PathBuf> {
    if !kvm_or_skip(test) {
        return None;
    }
    match std::env::var_os("MICROAGENT_TEST_KERNEL") {
        Some(k) => Some(PathBuf::from(k)),
        None => {
            common::require::skip(
                test,
                "linux",
                "MICROAGENT_TEST_KERNEL is not set (scripts/test.sh builds the kernel and sets it)",
            );
            None
        }
    }
}

#[test]
fn linux_reaches_userspace_on_two_vcpus_and_exits_zero() {
    let Some(kernel) = kernel_or_skip("linux_reaches_userspace_on_two_vcpus_and_exits_zero") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ma-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let init = dir.join("init");
    std::fs::write(
        &init,
        "#!/bin/sh\nmount -t proc proc /proc\necho MICROAGENT-CPUS $(grep -c ^processor /proc/cpuinfo)\n\
         echo MICROAGENT-USERSPACE-OK\nreboot -f\n",
    )
    .unwrap();
    let cpio = dir.join("initramfs.cpio");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/build-initramfs.sh");
    let st = std::process::Command::new(script)
        .arg(&cpio)
        .arg("--init")
        .arg(&init)
        .status()
        .unwrap();
    assert!(st.success(), "building the initramfs failed");

    let start = std::time::Instant::now();
    let out = microagent(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            cpio.to_str().unwrap(),
            "--vcpus",
            "2",
            "--mem",
            "256",
            "--cmdline",
            "console=ttyS0 panic=-1 quiet",
        ],
        Duration::from_secs(300),
    );
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "exit {:?}\n{text}\n{}",
        out.status,
        stderr(&out)
    );
    assert!(text.contains("MICROAGENT-USERSPACE-OK"), "{text}");
    assert!(
        text.contains("MICROAGENT-CPUS 2"),
        "both vCPUs online:\n{text}"
    );
    eprintln!(
        "linux boot to reset: {:.1} s",
        start.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(dir).unwrap();
}
