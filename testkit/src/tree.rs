//! A folder's contents as a value, so tests can compare two trees (a tar round trip, a copy
//! into a guest and back) with one `assert_eq!`.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// What one entry is: `'d'` (folder), `'l'` (symlink, with its target) or `'f'` (file, with
/// its bytes), and its permission bits under the caller's mask (0 for a symlink).
pub type Entry = (char, Vec<u8>, u32);

/// Every entry under `root`, by path relative to it (bytes: names need not be UTF-8).
/// `mode_mask` keeps the permission bits a comparison should hold to (0 ignores them).
/// Panics on anything it cannot read: it is for tests.
pub fn contents(root: &Path, mode_mask: u32) -> BTreeMap<Vec<u8>, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for item in std::fs::read_dir(&dir).unwrap() {
            let path = item.unwrap().path();
            let relative = path.strip_prefix(root).unwrap().as_os_str().as_bytes();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & mode_mask;
            let entry = if meta.is_dir() {
                stack.push(path.clone());
                ('d', Vec::new(), mode)
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                ('l', target.as_os_str().as_bytes().to_vec(), 0)
            } else {
                ('f', std::fs::read(&path).unwrap(), mode)
            };
            out.insert(relative.to_vec(), entry);
        }
    }
    out
}
