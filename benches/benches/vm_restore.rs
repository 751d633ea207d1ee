//! Restoring a whole 256 MiB VM in-process, up to its vCPUs running, against the floor: a
//! bare `mmap` of the same memory file plus `KVM_SET_USER_MEMORY_REGION` of the same size.
//! The VM is a minimal one (a kernel that spins), saved once into a store with 32 MiB of
//! non-zero pages and materialised; `file` maps that, `prefetch` serves it from the store
//! (here without a working set: the vCPUs run at once and fault pages in on demand).

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use ember_snapshot_store::{MemCache, Store};
use ember_vmm::{RestoreMode, SnapshotKind, VmConfig, Vmm, VmmOptions};
use vm_memory::{Bytes, GuestAddress};

const MEM_MIB: u32 = 256;
/// Non-zero guest memory written before the snapshot (the rest stays holes).
const WRITTEN_BYTES: usize = 32 << 20;

fn config(kernel: &Path) -> VmConfig {
    VmConfig {
        kernel: kernel.to_path_buf(),
        initrd: None,
        rootfs: None,
        read_only_rootfs: true,
        rootfs_overlay: None,
        vcpus: 1,
        mem_mib: MEM_MIB,
        cmdline_extra: None,
        vsock: None,
        net: None,
    }
}

fn quiet_options(cache: &MemCache) -> VmmOptions {
    VmmOptions {
        serial_out: Box::new(std::io::sink()),
        start: Instant::now(),
        mem_cache: Some(cache.clone()),
        ..Default::default()
    }
}

/// Saves a spinning VM as snapshot `base` in a store under `dir` and materialises it.
fn saved_vm(dir: &Path) -> (VmConfig, Arc<Store>, MemCache) {
    let kernel = dir.join("kernel.elf");
    // jmp $ at the entry.
    std::fs::write(
        &kernel,
        ember_vmm::kernel::minimal_elf(0x100_0000, &[0xeb, 0xfe]),
    )
    .expect("kernel");
    let config = config(&kernel);
    let store = Arc::new(Store::open(dir.join("store")).expect("store"));
    let cache = MemCache::new(dir.join("mem-cache"));
    let vmm = Vmm::build(&config, quiet_options(&cache)).expect("build");
    let data: Vec<u8> = (0..WRITTEN_BYTES)
        .map(|i| (i / 4096 % 251) as u8 + 1)
        .collect();
    vmm.memory()
        .write_slice(&data, GuestAddress(64 << 20))
        .expect("fill");
    let manifest = vmm
        .snapshot_as(&store, "base", SnapshotKind::Full)
        .expect("snapshot");
    vmm.shutdown().expect("shutdown");
    cache.materialise(&store, &manifest).expect("materialise");
    (config, store, cache)
}

/// One restore in `mode` up to its vCPUs running; the VM is torn down outside the timing.
fn restore_once(
    config: &VmConfig,
    store: &Arc<Store>,
    cache: &MemCache,
    mode: RestoreMode,
) -> Duration {
    let start = Instant::now();
    let vmm =
        Vmm::restore(config, store.clone(), "base", quiet_options(cache), mode).expect("restore");
    vmm.resume().expect("resume");
    let took = start.elapsed();
    vmm.shutdown().expect("shutdown");
    took
}

/// The floor: map the memory file `MAP_PRIVATE` and register it with a VM as one slot.
fn floor_once(vm: &kvm_ioctls::VmFd, file: &std::fs::File, len: usize) -> Duration {
    let start = Instant::now();
    // SAFETY: a fresh private mapping of a file we hold open; unmapped below, after KVM has
    // let go of it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let mut region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: len as u64,
        userspace_addr: addr as u64,
        flags: 0,
    };
    // SAFETY: the region is the live mapping above; it is removed from KVM (size 0) before
    // the mapping goes.
    unsafe { vm.set_user_memory_region(region) }.expect("register");
    let took = start.elapsed();
    region.memory_size = 0;
    // SAFETY: as above: deleting the slot.
    unsafe { vm.set_user_memory_region(region) }.expect("unregister");
    // SAFETY: the mapping made above, no longer used by anyone.
    unsafe { libc::munmap(addr, len) };
    took
}

fn restore_256mib(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("ember-bench-{}-vm-restore", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let (config, store, cache) = saved_vm(&dir);
    let manifest = store.load_manifest("base").expect("manifest");
    let mapped = cache.open(&manifest.memory).expect("materialised");

    // Where one restore of each mode spends its time (printed once, beside the figures).
    for mode in [RestoreMode::File, RestoreMode::Prefetch] {
        let vmm = Vmm::restore(&config, store.clone(), "base", quiet_options(&cache), mode)
            .expect("restore");
        vmm.resume().expect("resume");
        let steps: Vec<String> = vmm
            .timeline()
            .steps()
            .iter()
            .map(|m| format!("{} {:.2} ms", m.step, m.ms))
            .collect();
        eprintln!("one {mode} restore: {}", steps.join(", "));
        vmm.shutdown().expect("shutdown");
    }

    let mut group = c.benchmark_group("restore_256MiB_to_vcpus_running");
    group.sample_size(20);
    group.bench_function("mmap + KVM_SET_USER_MEMORY_REGION (floor)", |b| {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().expect("vm");
        let len = (u64::from(MEM_MIB) << 20) as usize;
        b.iter_custom(|iters| (0..iters).map(|_| floor_once(&vm, &mapped.file, len)).sum())
    });
    for mode in [RestoreMode::File, RestoreMode::Prefetch] {
        group.bench_function(format!("ember restore, mode {mode}"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| restore_once(&config, &store, &cache, mode))
                    .sum()
            })
        });
    }
    group.finish();
    drop(mapped);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, restore_256mib);
criterion_main!(benches);
