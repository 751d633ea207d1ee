//! Loading the guest kernel: an uncompressed ELF `vmlinux` or a `bzImage`, both entered at
//! their 64-bit entry point.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{setup_header, XLF_KERNEL_64};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::GuestAddress;

use crate::arch::x86_64::layout::HIMEM_START;
use crate::memory::GuestMemoryMmap;

/// Offset of the 64-bit entry point from a bzImage's protected-mode load address.
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;
/// Offset of the "HdrS" magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// The kernel image formats ember boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Errors of kernel loading.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open kernel {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read kernel {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat { path: String },
    #[error("cannot load {format:?} kernel {path}: {source}")]
    Load {
        path: String,
        format: KernelFormat,
        source: linux_loader::loader::Error,
    },
    #[error("bzImage {path} has no 64-bit entry point (xloadflags {xloadflags:#x})")]
    Not64Bit { path: String, xloadflags: u16 },
}

/// Where the kernel was loaded and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// The 64-bit entry point.
    pub entry: GuestAddress,
    /// First byte after the loaded image.
    pub kernel_end: u64,
    /// The bzImage's setup header, which goes into the zero page.
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// The kernel's highest allowed initrd address, if it states one.
    pub fn initrd_addr_max(&self) -> Option<u64> {
        self.setup_header.map(|h| u64::from(h.initrd_addr_max))
    }
}

/// Tells the format from the first bytes of an image.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(ELF_MAGIC) {
        Some(KernelFormat::Elf)
    } else if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(b"HdrS") {
        Some(KernelFormat::BzImage)
    } else {
        None
    }
}

/// Loads the kernel at `path` into `mem` (at or above [`HIMEM_START`]).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, KernelError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| KernelError::Open {
        path: shown.clone(),
        source,
    })?;
    let mut head = Vec::with_capacity(BZIMAGE_MAGIC_OFFSET + 4);
    (&mut file)
        .take(BZIMAGE_MAGIC_OFFSET as u64 + 4)
        .read_to_end(&mut head)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .map_err(|source| KernelError::Read {
            path: shown.clone(),
            source,
        })?;
    let format = detect_format(&head).ok_or(KernelError::UnknownFormat {
        path: shown.clone(),
    })?;
    let highmem = Some(GuestAddress(HIMEM_START));
    let load_error = |source| KernelError::Load {
        path: shown.clone(),
        format,
        source,
    };
    match format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, highmem).map_err(load_error)?;
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load,
                kernel_end: result.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, highmem).map_err(load_error)?;
            let header = result.setup_header;
            let xloadflags = header.map(|h| h.xloadflags).unwrap_or(0);
            if xloadflags & XLF_KERNEL_64 == 0 {
                return Err(KernelError::Not64Bit {
                    path: shown,
                    xloadflags,
                });
            }
            Ok(LoadedKernel {
                format,
                entry: GuestAddress(result.kernel_load.0 + BZIMAGE_ENTRY_64_OFFSET),
                kernel_end: result.kernel_end,
                setup_header: header,
            })
        }
    }
}

/// A minimal 64-bit ELF kernel: `code` loaded at guest physical `paddr`, which is also the
/// entry. For benchmarks and tests that need a VM but not Linux.
pub fn minimal_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
    let mut elf = vec![0u8; 0x1000];
    elf[0..4].copy_from_slice(ELF_MAGIC);
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // executable
    elf[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&paddr.to_le_bytes()); // entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // program headers
    elf[52..54].copy_from_slice(&64u16.to_le_bytes());
    elf[54..56].copy_from_slice(&56u16.to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R X
    elf[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // file offset
    elf[ph + 16..ph + 24].copy_from_slice(&(0xffff_ffff_8000_0000 | paddr).to_le_bytes());
    elf[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    elf[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + 0x1000).to_le_bytes());
    elf[ph + 48..ph + 56].copy_from_slice(&0x20_0000u64.to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use vm_memory::Bytes;
    use vmm_sys_util::tempfile::TempFile;

    /// A minimal x86-64 ELF with one PT_LOAD segment of `code` at physical `paddr`.
    fn tiny_bzimage(xloadflags: u16, payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 1024]; // boot sector + 1 setup sector
        image[0x1f1] = 1; // setup_sects
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes()); // version
        image[0x211] = 1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        image[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        image[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        image.extend_from_slice(payload);
        image
    }

    fn file_with(bytes: &[u8]) -> TempFile {
        let file = TempFile::new().unwrap();
        std::fs::write(file.as_path(), bytes).unwrap();
        file
    }

    #[test]
    fn formats_are_detected() {
        assert_eq!(
            detect_format(&super::minimal_elf(0x100_0000, b"x")),
            Some(KernelFormat::Elf)
        );
        assert_eq!(
            detect_format(&tiny_bzimage(1, b"x")),
            Some(KernelFormat::BzImage)
        );
        assert_eq!(detect_format(b"MZ"), None);
        assert_eq!(detect_format(&[0u8; 0x300]), None);
    }

    #[test]
    fn elf_is_loaded_at_its_physical_address() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let file = file_with(&super::minimal_elf(0x100_0000, b"\xf4kernel"));
        let kernel = load_kernel(&mem, file.as_path()).unwrap();
        assert_eq!(kernel.format, KernelFormat::Elf);
        assert_eq!(kernel.entry, GuestAddress(0x100_0000));
        assert_eq!(kernel.kernel_end, 0x100_0000 + 7 + 0x1000);
        assert!(kernel.setup_header.is_none());
        let mut buf = [0u8; 7];
        mem.read_slice(&mut buf, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(&buf, b"\xf4kernel");
    }

    #[test]
    fn bzimage_entry_is_load_address_plus_0x200() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let file = file_with(&tiny_bzimage(XLF_KERNEL_64, b"payload"));
        let kernel = load_kernel(&mem, file.as_path()).unwrap();
        assert_eq!(kernel.format, KernelFormat::BzImage);
        assert_eq!(kernel.entry, GuestAddress(0x10_0200));
        assert_eq!(kernel.initrd_addr_max(), Some(0x7fff_ffff));
        let mut buf = [0u8; 7];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&buf, b"payload");
    }

    #[test]
    fn bad_kernels_are_errors() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let file = file_with(&tiny_bzimage(0, b"payload"));
        assert!(matches!(
            load_kernel(&mem, file.as_path()),
            Err(KernelError::Not64Bit { .. })
        ));
        let file = file_with(b"not a kernel");
        assert!(matches!(
            load_kernel(&mem, file.as_path()),
            Err(KernelError::UnknownFormat { .. })
        ));
        // An ELF that does not fit in guest memory.
        let file = file_with(&super::minimal_elf(0x200_0000, b"x"));
        assert!(matches!(
            load_kernel(&mem, file.as_path()),
            Err(KernelError::Load { .. })
        ));
        assert!(matches!(
            load_kernel(&mem, Path::new("/nonexistent/vmlinux")),
            Err(KernelError::Open { .. })
        ));
    }
}
