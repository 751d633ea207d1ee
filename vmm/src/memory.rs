//! Guest RAM: how it is laid out, allocated and registered with KVM.
//!
//! RAM starts at guest physical 0. What does not fit below the 32-bit MMIO gap
//! ([`MMIO_GAP_START`]..[`MMIO_GAP_END`]) is placed from 4 GiB up. The backing is anonymous,
//! private and `MAP_NORESERVE`, so untouched guest pages cost nothing; all of it is created by
//! [`create_guest_memory`] so that snapshot restore can later swap the backing in one place.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The guest memory type shared with the devices (dirty pages tracked per page).
pub use ember_devices::GuestMemoryMmap;

/// Guest RAM smaller than this cannot hold the boot structures and a kernel.
pub const MIN_MEM_BYTES: u64 = 8 << 20;
/// Guest RAM larger than this is refused (a typo guard, not a KVM limit).
pub const MAX_MEM_BYTES: u64 = 1 << 40;
const PAGE_SIZE: u64 = 4096;

/// Errors of guest memory creation and registration.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0:#x} bytes is below the minimum of {MIN_MEM_BYTES:#x}")]
    TooSmall(u64),
    #[error("guest memory size {0:#x} bytes is above the maximum of {MAX_MEM_BYTES:#x}")]
    TooLarge(u64),
    #[error("guest memory size {0:#x} bytes is not a multiple of the 4 KiB page size")]
    Unaligned(u64),
    #[error("cannot map {size:#x} bytes of guest memory at {addr:#x}: {source}")]
    Mmap {
        addr: u64,
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot reserve {size:#x} bytes of host address space for guest memory at {addr:#x}: {source}")]
    Reserve {
        addr: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot duplicate the descriptor of the guest memory file: {0}")]
    FileClone(#[source] std::io::Error),
    #[error("guest memory region at {0:#x} overflows the address space")]
    Region(u64),
    #[error(
        "cannot advise the kernel about guest memory at {addr:#x} ({size:#x} bytes): {source}"
    )]
    Advise {
        addr: u64,
        size: u64,
        source: std::io::Error,
    },
    #[error("cannot read KVM's dirty page log of memory slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot assemble the guest memory regions: {0}")]
    Collection(vm_memory::GuestRegionCollectionError),
    #[error("cannot register guest memory slot {slot} ({size:#x} bytes at {addr:#x}) with KVM: {source}")]
    Register {
        slot: u32,
        addr: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

/// The RAM ranges (start, length) for `mem_bytes` of guest memory: below the MMIO gap first,
/// the rest from 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// Checks a requested guest memory size.
pub fn check_mem_size(mem_bytes: u64) -> Result<(), MemoryError> {
    if mem_bytes < MIN_MEM_BYTES {
        return Err(MemoryError::TooSmall(mem_bytes));
    }
    if mem_bytes > MAX_MEM_BYTES {
        return Err(MemoryError::TooLarge(mem_bytes));
    }
    if mem_bytes & (PAGE_SIZE - 1) != 0 {
        return Err(MemoryError::Unaligned(mem_bytes));
    }
    Ok(())
}

/// Allocates `mem_bytes` of guest RAM: anonymous, private, `MAP_NORESERVE`, with a dirty
/// page bitmap per region.
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemoryMmap, MemoryError> {
    guest_memory(mem_bytes, None)
}

/// Maps `file` (a snapshot's materialised memory, exactly `mem_bytes` long) as guest RAM,
/// `MAP_PRIVATE`: the host kernel serves each first touch from the page cache, processes
/// mapping the same file share its clean pages, and guest writes stay private to this VM.
pub fn map_guest_memory_from_file(
    mem_bytes: u64,
    file: &std::fs::File,
) -> Result<GuestMemoryMmap, MemoryError> {
    guest_memory(mem_bytes, Some(file))
}

/// The regions of `mem_bytes` of guest RAM, each with a dirty page bitmap: anonymous, or
/// the consecutive parts of `file` (page i of RAM at offset i * 4096).
fn guest_memory(
    mem_bytes: u64,
    file: Option<&std::fs::File>,
) -> Result<GuestMemoryMmap, MemoryError> {
    check_mem_size(mem_bytes)?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, size) in ram_ranges(mem_bytes) {
        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(mem_bytes))?;
        let mut builder = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
        builder = match file {
            Some(file) => {
                let file = file.try_clone().map_err(MemoryError::FileClone)?;
                builder
                    .with_file_offset(FileOffset::new(file, offset))
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            }
            None => builder
                .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE),
        };
        regions.push(build_region(builder, addr, size)?);
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Collection)
}

/// Where host huge pages and KVM's 2 MiB second-level mappings meet: a guest 2 MiB page can
/// be mapped by one large entry only if its host address has the same offset in a 2 MiB page.
const HUGE_PAGE: usize = 2 << 20;

/// A booting guest's RAM, mapped at 2 MiB-aligned host addresses (every RAM range starts
/// 2 MiB-aligned in guest physical memory). Host kernels before 6.7 place large anonymous
/// mappings at any page boundary; then KVM cannot use 2 MiB mappings for the guest at all,
/// and every 4 KiB page the booting kernel touches is a separate second-level fault (the
/// guest's memory map, page tables and initramfs alone are thousands). QEMU aligns its RAM
/// the same way.
///
/// The mappings outlive this value (the regions of the returned memory point into them and
/// may have been cloned into device threads): dropping it only gives the pages back to the
/// host (`MADV_DONTNEED`; any late reader sees zeros, never unmapped memory).
#[derive(Debug)]
pub struct BootRam {
    ranges: Vec<(usize, usize)>,
}

impl Drop for BootRam {
    fn drop(&mut self) {
        for &(addr, len) in &self.ranges {
            // SAFETY: the range is a private anonymous mapping this value made and never
            // unmaps; dropping its pages cannot invalidate any pointer into it.
            unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        }
    }
}

/// Allocates `mem_bytes` of guest RAM as [`create_guest_memory`] does, but at 2 MiB-aligned
/// host addresses (see [`BootRam`]). Keep the [`BootRam`] as long as the VM.
pub fn create_boot_memory(mem_bytes: u64) -> Result<(GuestMemoryMmap, BootRam), MemoryError> {
    check_mem_size(mem_bytes)?;
    let mut regions = Vec::new();
    let mut ram = BootRam { ranges: Vec::new() };
    for (addr, size) in ram_ranges(mem_bytes) {
        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(mem_bytes))?;
        let host = map_aligned(len).map_err(|source| MemoryError::Reserve {
            addr: addr.0,
            size,
            source,
        })?;
        ram.ranges.push((host as usize, len));
        // SAFETY: `host` is the start of a live read-write mapping of `len` bytes that is
        // never unmapped (see `BootRam`).
        let builder = unsafe {
            MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .with_raw_mmap_pointer(host)
        };
        regions.push(build_region(builder, addr, size)?);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Collection)?;
    Ok((mem, ram))
}

/// Maps `len` bytes of private anonymous memory at a 2 MiB-aligned address: reserves
/// `len` + 2 MiB without access, gives back the slack on both sides of the aligned part, and
/// opens that part for reading and writing.
fn map_aligned(len: usize) -> std::io::Result<*mut u8> {
    let reserved = len + HUGE_PAGE;
    let flags = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserved,
            libc::PROT_NONE,
            flags,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = base as usize;
    let start = (base + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    let (head, tail) = (start - base, base + reserved - (start + len));
    // SAFETY: both ranges lie inside the reservation just made, which nothing else uses.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: [start, start + len) is the rest of the reservation, owned by this call.
    let rc = unsafe {
        libc::mprotect(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // SAFETY: as above; nothing points into the range yet.
        unsafe { libc::munmap(start as *mut libc::c_void, len) };
        return Err(err);
    }
    Ok(start as *mut u8)
}

/// Maps (or, for a raw pointer, wraps) one region of guest RAM at guest address `addr`.
fn build_region(
    builder: MmapRegionBuilder<AtomicBitmap>,
    addr: GuestAddress,
    size: u64,
) -> Result<GuestRegionMmap<AtomicBitmap>, MemoryError> {
    let mapping: MmapRegion<AtomicBitmap> =
        builder.build().map_err(|source| MemoryError::Mmap {
            addr: addr.0,
            size,
            source,
        })?;
    GuestRegionMmap::new(mapping, addr).ok_or(MemoryError::Region(addr.0))
}

/// The guest pages this process has touched since `mem` was mapped (present in, or swapped
/// out of, its page tables), as page indices over all regions in address order: for memory
/// mapped from a file, what the guest and the devices needed. Read from `/proc/self/pagemap`.
pub fn touched_pages(mem: &GuestMemoryMmap) -> std::io::Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut touched = Vec::new();
    let mut first_page = 0u64;
    let mut entries = vec![0u8; 8 * 4096];
    for region in mem.iter() {
        let pages = region.len() / PAGE_SIZE;
        let host_first = region.as_ptr() as u64 / PAGE_SIZE;
        let mut done = 0u64;
        while done < pages {
            let batch = (pages - done).min(4096);
            let bytes = &mut entries[..batch as usize * 8];
            pagemap.read_exact_at(bytes, (host_first + done) * 8)?;
            for (i, entry) in bytes.chunks_exact(8).enumerate() {
                let mut word = [0u8; 8];
                word.copy_from_slice(entry);
                if u64::from_le_bytes(word) & (PRESENT | SWAPPED) != 0 {
                    touched.push(first_page + done + i as u64);
                }
            }
            done += batch;
        }
        first_page += pages;
    }
    Ok(touched)
}

/// Maps `pages` (page indices over all regions in address order, any order) of memory
/// mapped from a file into this process's page tables now (`MADV_POPULATE_READ`), so the
/// guest's first touches of them find the host side ready instead of faulting through the
/// page cache one by one. Returns how many pages were populated; a kernel without the
/// advice (before 5.14) populates none.
pub fn populate(mem: &GuestMemoryMmap, pages: &[u64]) -> u64 {
    const MADV_POPULATE_READ: libc::c_int = 22;
    let mut sorted = pages.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut done = 0u64;
    let mut first_page = 0u64;
    for region in mem.iter() {
        let count = region.len() / PAGE_SIZE;
        let inside: Vec<u64> = sorted
            .iter()
            .filter(|p| (first_page..first_page + count).contains(p))
            .map(|p| p - first_page)
            .collect();
        let mut i = 0;
        while i < inside.len() {
            let start = inside[i];
            let mut end = start + 1;
            while i + 1 < inside.len() && inside[i + 1] == end {
                i += 1;
                end += 1;
            }
            i += 1;
            // SAFETY: the range lies inside one live mapping owned by `mem`; populating
            // only fills page tables with the file's pages, it never changes contents.
            let rc = unsafe {
                libc::madvise(
                    region.as_ptr().add((start * PAGE_SIZE) as usize) as *mut libc::c_void,
                    ((end - start) * PAGE_SIZE) as usize,
                    MADV_POPULATE_READ,
                )
            };
            if rc != 0 {
                return done;
            }
            done += end - start;
        }
        first_page += count;
    }
    done
}

/// Asks the kernel to back `mem` with 4 KiB pages only. A restore writes scattered pages into
/// fresh memory: with transparent huge pages each first write would allocate and clear 2 MiB
/// (more than half of an eager restore's time in the lab) and inflate the resident set.
pub fn disable_huge_pages(mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for region in mem.iter() {
        // SAFETY: the range is exactly one live mapping owned by `mem`; MADV_NOHUGEPAGE only
        // changes how future faults are backed, never the contents.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr() as *mut libc::c_void,
                region.len() as usize,
                libc::MADV_NOHUGEPAGE,
            )
        };
        if rc != 0 {
            return Err(MemoryError::Advise {
                addr: region.start_addr().0,
                size: region.len(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// The guest pages written since the last call (or since dirty logging was switched on), as
/// page indices over all regions in address order (the numbering of a snapshot's memory map):
/// those the guest wrote (KVM's log) and those the VMM's devices wrote (the regions' bitmaps).
/// Both logs are cleared. Call only while the vCPUs are paused and the devices are idle.
pub fn take_dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<u64>, MemoryError> {
    let mut dirty = Vec::new();
    let mut first_page = 0u64;
    for (slot, region) in mem.iter().enumerate() {
        let len = region.len() as usize;
        let kvm_log =
            vm.get_dirty_log(slot as u32, len)
                .map_err(|source| MemoryError::DirtyLog {
                    slot: slot as u32,
                    source,
                })?;
        let mapping: &MmapRegion<AtomicBitmap> = region;
        let vmm_log = mapping.bitmap().get_and_reset();
        let pages = (region.len() / PAGE_SIZE) as usize;
        for (word_index, (kvm, vmm)) in kvm_log.iter().zip(vmm_log.iter()).enumerate() {
            let mut word = kvm | vmm;
            while word != 0 {
                let bit = word.trailing_zeros() as usize;
                word &= word - 1;
                let page = word_index * 64 + bit;
                if page < pages {
                    dirty.push(first_page + page as u64);
                }
            }
        }
        first_page += pages as u64;
    }
    Ok(dirty)
}

/// Registers every region of `mem` with KVM, slot numbers from 0 in address order.
///
/// # Safety
///
/// KVM keeps pointers into `mem`'s mappings: the caller must keep `mem` (or a clone sharing its
/// regions) alive for as long as `vm` and any of its vCPUs exist.
pub unsafe fn register_guest_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    // SAFETY: forwarded to the caller.
    unsafe { register_guest_memory_with(vm, mem, false) }
}

/// As [`register_guest_memory`]; with `log_dirty`, KVM records the pages the guest writes
/// (re-registering the same slots switches logging on or off, and clears the log).
///
/// # Safety
///
/// As [`register_guest_memory`].
pub unsafe fn register_guest_memory_with(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let addr = region.start_addr().0;
        let size = region.len();
        let host = region.as_ptr() as u64;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: addr,
            memory_size: size,
            userspace_addr: host,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the region describes exactly one live mapping owned by `mem`; the caller
        // guarantees that mapping outlives the VM.
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(|source| {
            MemoryError::Register {
                slot,
                addr,
                size,
                source,
            }
        })?;
    }
    Ok(())
}

/// The end (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn boot_memory_sits_at_2_mib_aligned_host_addresses_and_works() {
        // Two regions: RAM below the MMIO gap and above 4 GiB.
        let size = MMIO_GAP_START + (64 << 20);
        let (mem, ram) = create_boot_memory(size).unwrap();
        assert_eq!(mem.num_regions(), 2);
        for region in mem.iter() {
            let host = region.as_ptr() as usize;
            assert_eq!(
                host % HUGE_PAGE,
                0,
                "region at {:#x}",
                region.start_addr().0
            );
            assert_eq!(host % HUGE_PAGE, region.start_addr().0 as usize % HUGE_PAGE);
        }
        let last = GuestAddress((4 << 30) + (64 << 20) - 8);
        mem.write_obj(0x1234_5678_u64, last).unwrap();
        mem.write_obj(7_u64, GuestAddress(0)).unwrap();
        assert_eq!(mem.read_obj::<u64>(last).unwrap(), 0x1234_5678);
        // Dropping the RAM gives its pages back; the mapping stays readable (zeros).
        drop(ram);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0)).unwrap(), 0);
    }

    #[test]
    fn small_memory_is_one_region_from_zero() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(
            ram_ranges(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START)]
        );
    }

    #[test]
    fn memory_above_3g_goes_above_4g() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(
            ranges,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(
            check_mem_size(1 << 20),
            Err(MemoryError::TooSmall(_))
        ));
        assert!(matches!(
            check_mem_size((64 << 20) + 1),
            Err(MemoryError::Unaligned(_))
        ));
        assert!(matches!(
            check_mem_size(2 << 40),
            Err(MemoryError::TooLarge(_))
        ));
        assert!(check_mem_size(128 << 20).is_ok());
    }

    #[test]
    fn creates_noreserve_memory_with_a_gap() {
        // 5 GiB of address space costs nothing with MAP_NORESERVE until touched.
        let mem = create_guest_memory(5 << 30).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(low_ram_end(&mem), MMIO_GAP_START);
        assert_eq!(mem.last_addr(), GuestAddress((6 << 30) - 1));
        assert!(mem
            .write_obj(0xdead_beef_u32, GuestAddress(MMIO_GAP_END))
            .is_ok());
        assert!(mem.write_obj(1u8, GuestAddress(MMIO_GAP_START)).is_err());
        for region in mem.iter() {
            assert_ne!(region.flags() & libc::MAP_NORESERVE, 0);
        }
    }

    #[test]
    fn registers_with_kvm() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        let mem = create_guest_memory(64 << 20).unwrap();
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        // SAFETY: `mem` is declared before `vm` and so outlives it.
        unsafe { register_guest_memory(&vm, &mem) }.unwrap();
    }

    #[test]
    fn device_writes_show_in_the_dirty_pages_once() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        use vm_memory::Bytes;
        let mem = create_guest_memory(64 << 20).unwrap();
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        // SAFETY: `mem` is declared before `vm` and so outlives it.
        unsafe { register_guest_memory_with(&vm, &mem, true) }.unwrap();
        assert!(take_dirty_pages(&vm, &mem).unwrap().is_empty());
        // Writes through vm-memory (what devices do) are tracked by the regions' bitmaps.
        mem.write_obj(7u64, GuestAddress(3 * 4096 + 8)).unwrap();
        mem.write_obj(7u64, GuestAddress(70 * 4096)).unwrap();
        assert_eq!(take_dirty_pages(&vm, &mem).unwrap(), vec![3, 70]);
        assert!(take_dirty_pages(&vm, &mem).unwrap().is_empty());
    }
}
