//! The Linux boot protocol pieces: the e820 map, the zero page (`boot_params`), the kernel
//! command line and the initrd.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, EBDA_END, EBDA_START, HIMEM_START, MMIO_GAP_START,
    VIRTIO_MMIO_SIZE, ZERO_PAGE_ADDR,
};
use crate::memory::GuestMemoryMmap;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The command line every guest starts from. (Not `init_on_free=1`: it would make freed pages
/// zero pages in snapshots, but the guest then zeroes all of its memory while it boots, which
/// backs every guest page on the host and made boots in the lab ~5x slower.)
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule \
     i8042.noaux i8042.nomux i8042.dumbkbd tsc=reliable quiet";

const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id: the kernel accepts it.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Alignment a relocatable ELF kernel is told it was loaded with.
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// `initrd_addr_max` assumed when the kernel gives none (ELF vmlinux): the 2 GiB limit of
/// protocol 2.03+.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const PAGE_SIZE: u64 = 4096;

/// Errors of boot protocol set-up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("invalid kernel command line {cmdline:?}: {source}")]
    Cmdline {
        cmdline: String,
        source: linux_loader::cmdline::Error,
    },
    #[error("kernel command line is {len} bytes with its NUL; the limit is {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong { len: usize },
    #[error("cannot write the kernel command line at {CMDLINE_ADDR:#x}: {0}")]
    WriteCmdline(vm_memory::GuestMemoryError),
    #[error("cannot write the zero page at {ZERO_PAGE_ADDR:#x}: {0}")]
    WriteZeroPage(vm_memory::GuestMemoryError),
    #[error("the e820 map has {0} entries; the zero page holds 128")]
    TooManyE820Entries(usize),
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd {path} is empty")]
    EmptyInitrd { path: String },
    #[error("initrd of {size:#x} bytes does not fit between the kernel end {kernel_end:#x} and {top:#x}")]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        top: u64,
    },
    #[error("cannot load the initrd into guest memory at {addr:#x}: {source}")]
    LoadInitrd {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the initrd was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdInfo {
    pub addr: u64,
    pub size: u64,
}

fn e820(addr: u64, size: u64, kind: u32) -> boot_e820_entry {
    boot_e820_entry {
        addr,
        size,
        r#type: kind,
    }
}

/// The e820 map for RAM ranges `(start, len)` as [`crate::memory::ram_ranges`] lays them out:
/// conventional memory below the EBDA, the EBDA reserved (MP table), RAM from 1 MiB to the
/// end of low memory, and high RAM above 4 GiB as is.
pub fn e820_map(ram: &[(u64, u64)]) -> Vec<boot_e820_entry> {
    let mut map = Vec::new();
    for &(start, len) in ram {
        let end = start + len;
        if start == 0 {
            map.push(e820(0, EBDA_START.min(end), E820_RAM));
            if end > EBDA_START {
                map.push(e820(
                    EBDA_START,
                    EBDA_END.min(end) - EBDA_START,
                    E820_RESERVED,
                ));
            }
            if end > HIMEM_START {
                map.push(e820(HIMEM_START, end - HIMEM_START, E820_RAM));
            }
        } else {
            map.push(e820(start, len, E820_RAM));
        }
    }
    map
}

/// The RAM ranges of `mem`, as `(start, len)`.
pub fn ram_of(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// Builds the kernel command line: [`DEFAULT_CMDLINE`], one `virtio_mmio.device=` per device
/// base (slot index = IRQ offset), the root device if any, then `extra` (last, so it wins).
pub fn build_cmdline(
    virtio_devices: &[(u64, u32)],
    root: Option<(&str, bool)>,
    extra: Option<&str>,
) -> Result<Cmdline, BootError> {
    let wrap = |source| BootError::Cmdline {
        cmdline: DEFAULT_CMDLINE.to_string(),
        source,
    };
    let mut cmdline = Cmdline::try_from(DEFAULT_CMDLINE, CMDLINE_MAX_SIZE).map_err(wrap)?;
    for &(base, irq) in virtio_devices {
        cmdline
            .add_virtio_mmio_device(VIRTIO_MMIO_SIZE, GuestAddress(base), irq, None)
            .map_err(|source| BootError::Cmdline {
                cmdline: format!("virtio_mmio.device=4K@{base:#x}:{irq}"),
                source,
            })?;
    }
    if let Some((device, read_only)) = root {
        let root = format!("root={device} {}", if read_only { "ro" } else { "rw" });
        cmdline
            .insert_str(&root)
            .map_err(|source| BootError::Cmdline {
                cmdline: root,
                source,
            })?;
    }
    if let Some(extra) = extra.map(str::trim).filter(|e| !e.is_empty()) {
        // An extra with its own "--" passes arguments to init.
        let (boot, init) = match extra.split_once("-- ") {
            Some((boot, init)) => (boot.trim(), Some(init.trim())),
            None if extra == "--" => ("", None),
            None => (extra, None),
        };
        if !boot.is_empty() {
            cmdline
                .insert_str(boot)
                .map_err(|source| BootError::Cmdline {
                    cmdline: boot.to_string(),
                    source,
                })?;
        }
        if let Some(init) = init.filter(|i| !i.is_empty()) {
            cmdline
                .insert_init_args(init)
                .map_err(|source| BootError::Cmdline {
                    cmdline: init.to_string(),
                    source,
                })?;
        }
    }
    Ok(cmdline)
}

/// Writes `cmdline`, NUL-terminated, at [`CMDLINE_ADDR`]; returns its length with the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<usize, BootError> {
    let cstring = cmdline.as_cstring().map_err(|source| BootError::Cmdline {
        cmdline: format!("{cmdline:?}"),
        source,
    })?;
    let bytes = cstring.as_bytes_with_nul();
    if bytes.len() > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong { len: bytes.len() });
    }
    mem.write_slice(bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(BootError::WriteCmdline)?;
    Ok(bytes.len())
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible below both the end
/// of low RAM and the kernel's `initrd_addr_max`, and above `kernel_end`.
pub fn initrd_addr(
    low_ram_end: u64,
    initrd_addr_max: Option<u64>,
    kernel_end: u64,
    size: u64,
) -> Result<u64, BootError> {
    let limit = initrd_addr_max
        .filter(|m| *m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let top = low_ram_end.min(limit.saturating_add(1)).min(MMIO_GAP_START);
    let too_large = || BootError::InitrdTooLarge {
        size,
        kernel_end,
        top,
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    Ok(addr)
}

/// Loads the initrd at `path` at the top of low memory.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    low_ram_end: u64,
    initrd_addr_max: Option<u64>,
    kernel_end: u64,
) -> Result<InitrdInfo, BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenInitrd {
        path: shown.clone(),
        source,
    })?;
    let size = file
        .seek(SeekFrom::End(0))
        .and_then(|size| file.seek(SeekFrom::Start(0)).map(|_| size))
        .map_err(|source| BootError::ReadInitrd {
            path: shown.clone(),
            source,
        })?;
    if size == 0 {
        return Err(BootError::EmptyInitrd { path: shown });
    }
    let addr = initrd_addr(low_ram_end, initrd_addr_max, kernel_end, size)?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge {
        size,
        kernel_end,
        top: low_ram_end,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| BootError::LoadInitrd { addr, source })?;
    Ok(InitrdInfo { addr, size })
}

/// Fills the zero page. `header` is the bzImage's setup header (None for an ELF vmlinux).
pub fn build_boot_params(
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdInfo>,
    e820_entries: &[boot_e820_entry],
) -> Result<boot_params, BootError> {
    if e820_entries.len() > 128 {
        return Err(BootError::TooManyE820Entries(e820_entries.len()));
    }
    let mut params = boot_params::default();
    if let Some(header) = header {
        params.hdr = header;
    } else {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len.saturating_sub(1) as u32;
    if let Some(initrd) = initrd {
        // Both are below the 32-bit MMIO gap, so they fit the 32-bit fields.
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let mut table = params.e820_table;
    for (slot, entry) in table.iter_mut().zip(e820_entries) {
        *slot = *entry;
    }
    params.e820_table = table;
    params.e820_entries = e820_entries.len() as u8;
    Ok(params)
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`].
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(BootError::WriteZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, ram_ranges};
    use vm_memory::ByteValued;
    use vmm_sys_util::tempfile::TempFile;

    fn ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
        ram_ranges(mem_bytes)
            .into_iter()
            .map(|(a, l)| (a.0, l))
            .collect()
    }

    fn triple(e: &boot_e820_entry) -> (u64, u64, u32) {
        (e.addr, e.size, e.r#type)
    }

    #[test]
    fn e820_for_low_memory_only() {
        let map = e820_map(&ranges(256 << 20));
        let got: Vec<_> = map.iter().map(triple).collect();
        assert_eq!(
            got,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x400, E820_RESERVED),
                (0x10_0000, (256 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_with_high_memory() {
        let map = e820_map(&ranges(5 << 30));
        let got: Vec<_> = map.iter().map(triple).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[2], (0x10_0000, (3 << 30) - 0x10_0000, E820_RAM));
        assert_eq!(got[3], (4 << 30, 2 << 30, E820_RAM));
    }

    #[test]
    fn default_cmdline_with_devices_root_and_extra() {
        let cmdline = build_cmdline(
            &[(0xd000_0000, 5), (0xd000_1000, 6)],
            Some(("/dev/vda", true)),
            Some("loglevel=8 -- init_arg"),
        )
        .unwrap();
        let s = cmdline.as_cstring().unwrap().into_string().unwrap();
        assert!(s.starts_with(DEFAULT_CMDLINE), "{s}");
        assert!(s.contains("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"));
        assert!(s.contains("root=/dev/vda ro loglevel=8"), "{s}");
        assert!(s.ends_with(" -- init_arg"), "{s}");
    }

    #[test]
    fn read_write_root_and_no_extra() {
        let s = build_cmdline(&[], Some(("/dev/vda", false)), Some("  ")).unwrap();
        let s = s.as_cstring().unwrap().into_string().unwrap();
        assert!(s.ends_with("quiet root=/dev/vda rw"), "{s}");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let extra = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            build_cmdline(&[], None, Some(&extra)),
            Err(BootError::Cmdline { .. })
        ));
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let cmdline = build_cmdline(&[], None, None).unwrap();
        let len = write_cmdline(&mem, &cmdline).unwrap();
        assert_eq!(len, DEFAULT_CMDLINE.len() + 1);
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&buf[..len - 1], DEFAULT_CMDLINE.as_bytes());
        assert_eq!(buf[len - 1], 0);
    }

    #[test]
    fn initrd_goes_to_the_top_page_aligned() {
        assert_eq!(
            initrd_addr(0x800_0000, None, 0x200_0000, 0x1800).unwrap(),
            0x7ff_e000
        );
        // initrd_addr_max below the end of RAM wins.
        assert_eq!(
            initrd_addr(0xc000_0000, Some(0x37ff_ffff), 0x200_0000, 0x1000).unwrap(),
            0x37ff_f000
        );
        assert!(matches!(
            initrd_addr(0x800_0000, None, 0x7ff_0000, 0x2_0000),
            Err(BootError::InitrdTooLarge { .. })
        ));
        assert!(initrd_addr(0x1000, None, 0, 0x2000).is_err());
    }

    #[test]
    fn initrd_is_loaded_and_in_boot_params() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let file = TempFile::new().unwrap();
        std::fs::write(file.as_path(), b"initrd-bytes").unwrap();
        let info = load_initrd(&mem, file.as_path(), 32 << 20, None, 0x100_0000).unwrap();
        assert_eq!(
            info,
            InitrdInfo {
                addr: (32 << 20) - 0x1000,
                size: 12
            }
        );
        let mut buf = [0u8; 12];
        mem.read_slice(&mut buf, GuestAddress(info.addr)).unwrap();
        assert_eq!(&buf, b"initrd-bytes");

        let params = build_boot_params(None, 10, Some(info), &e820_map(&ranges(32 << 20))).unwrap();
        let (image, size) = (params.hdr.ramdisk_image, params.hdr.ramdisk_size);
        assert_eq!((u64::from(image), u64::from(size)), (info.addr, 12));
    }

    #[test]
    fn missing_or_empty_initrd_is_an_error() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let missing = Path::new("/nonexistent/initrd");
        assert!(matches!(
            load_initrd(&mem, missing, 16 << 20, None, 0),
            Err(BootError::OpenInitrd { .. })
        ));
        let empty = TempFile::new().unwrap();
        assert!(matches!(
            load_initrd(&mem, empty.as_path(), 16 << 20, None, 0),
            Err(BootError::EmptyInitrd { .. })
        ));
    }

    #[test]
    fn zero_page_fields() {
        let map = e820_map(&ranges(64 << 20));
        let params = build_boot_params(None, 100, None, &map).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.cmdline_size }, 99);
        assert_eq!({ hdr.kernel_alignment }, 0x100_0000);
        assert_eq!(params.e820_entries, 3);
        let table = params.e820_table;
        assert_eq!(
            triple(&table[2]),
            (0x10_0000, (64 << 20) - 0x10_0000, E820_RAM)
        );

        // The bzImage's header is kept, with the loader's fields set.
        let header = setup_header {
            version: 0x20f,
            code32_start: 0x10_0000,
            ..Default::default()
        };
        let params = build_boot_params(Some(header), 1, None, &map).unwrap();
        assert_eq!({ params.hdr.version }, 0x20f);
        assert_eq!({ params.hdr.boot_flag }, 0xaa55);

        let mem = create_guest_memory(16 << 20).unwrap();
        write_boot_params(&mem, &params).unwrap();
        let back: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!(back.as_slice(), params.as_slice());
        let too_many = vec![e820(0, 1, E820_RAM); 129];
        assert!(matches!(
            build_boot_params(None, 1, None, &too_many),
            Err(BootError::TooManyE820Entries(129))
        ));
    }
}
