//! `ember snapshots` and `ember store …`: list and delete snapshots, and inspect and
//! maintain the content-addressed snapshot store (statistics, verification, garbage
//! collection).
//!
//! None of these commands creates a store: a store directory that does not exist (or is an
//! empty directory) reads as an empty store, with a note on stderr naming it, so a mistyped
//! `--store` is visible without failing on a machine that never saved a snapshot.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember_client::types::SnapshotInfo;
use ember_snapshot_store::{
    GcReport, ManifestError, Problem, ProblemKind, Store, StoreError, StoreStats, VerifyReport,
};
use serde_json::{json, Value};

use ember_service::snapshots::snapshot_info;

const MIB: u64 = 1 << 20;

/// Why a snapshot or store command failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreCmdError {
    #[error("cannot access the snapshot store {}: {source}", dir.display())]
    Access {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the snapshot store {} is not a directory", dir.display())]
    NotADirectory { dir: PathBuf },
    #[error("{} is not a snapshot store (it has neither packs/ nor manifests/)", dir.display())]
    NotAStore { dir: PathBuf },
    #[error(transparent)]
    Open(Box<ember_sandbox::defaults::OpenStoreError>),
    #[error("no snapshot {id:?} in the store {}", dir.display())]
    NoSnapshot { id: String, dir: PathBuf },
    #[error("cannot {what} {}: {source}", dir.display())]
    Store {
        what: &'static str,
        dir: PathBuf,
        #[source]
        source: Box<StoreError>,
    },
    #[error("cannot delete snapshot {id:?}: {source}")]
    Delete {
        id: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("garbage collection of {url} failed: {source}")]
    Remote {
        url: String,
        #[source]
        source: Box<ember_remote::RemoteError>,
    },
}

/// Names what a store operation on `dir` was doing when it failed.
fn store_error<'a>(
    what: &'static str,
    dir: &'a Path,
) -> impl FnOnce(StoreError) -> StoreCmdError + 'a {
    move |source| StoreCmdError::Store {
        what,
        dir: dir.to_path_buf(),
        source: Box::new(source),
    }
}

/// `value` as indented JSON (plain data: it always serialises).
fn pretty(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).expect("plain data serialises to JSON")
}

/// `ember snapshots [--store DIR] [--json]` and `ember snapshots delete ID`.
#[derive(clap::Args, Debug)]
pub struct SnapshotsArgs {
    #[command(subcommand)]
    pub action: Option<SnapshotsAction>,
    /// The snapshot store (default: $EMBER_STORE, else ~/.local/share/ember/store).
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Print a JSON array (one object per snapshot) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// List the snapshots of the ember service listening here instead of reading a store.
    #[command(flatten)]
    pub service: crate::remote::ServiceArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotsAction {
    /// Delete a snapshot (its manifest). Its objects stay in the store until `ember store gc`
    /// reclaims the ones no other snapshot uses.
    Delete {
        /// The snapshot to delete.
        id: String,
    },
}

/// `ember store stats|verify|gc [--store DIR]`.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    #[command(subcommand)]
    pub action: StoreAction,
    /// The snapshot store (default: $EMBER_STORE, else ~/.local/share/ember/store).
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum StoreAction {
    /// Snapshots, logical bytes (memory and disks as the guests see them) against the bytes
    /// stored, objects, packs, zero pages and the resulting deduplication ratio.
    Stats {
        /// Print the figures as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every object of every pack and check that every snapshot's objects exist.
    /// Exits 1, naming each bad object and its pack, if anything is wrong.
    Verify {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Remove the objects no snapshot references (after `ember snapshots delete`), and what
    /// crashed writers left behind.
    Gc {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Collect the remote tier at this URL (`s3://BUCKET/PREFIX`, `AWS_*` environment)
        /// instead of the local store: remove the packs no remote manifest names.
        #[arg(long, value_name = "URL")]
        remote: Option<String>,
        /// With --remote: keep unnamed packs younger than this many seconds (a push may be
        /// in flight on another host).
        #[arg(long, default_value_t = 3600)]
        grace_s: u64,
    },
}

/// Runs `ember snapshots …`; returns the exit code.
pub fn snapshots(args: SnapshotsArgs) -> i32 {
    let dir = args
        .store
        .unwrap_or_else(ember_sandbox::defaults::default_store_dir);
    let result = match args.action {
        None => list(&dir, args.json),
        Some(SnapshotsAction::Delete { id }) => delete(&dir, &id),
    };
    finish(result)
}

/// Runs `ember store …`; returns the exit code.
pub fn store(args: StoreArgs) -> i32 {
    let dir = args
        .store
        .unwrap_or_else(ember_sandbox::defaults::default_store_dir);
    let result = match args.action {
        StoreAction::Stats { json } => stats(&dir, json),
        StoreAction::Verify { json } => verify(&dir, json),
        StoreAction::Gc {
            json,
            remote: Some(url),
            grace_s,
        } => remote_gc(&url, grace_s, json),
        StoreAction::Gc { json, .. } => gc(&dir, json),
    };
    finish(result)
}

fn finish(result: Result<i32, StoreCmdError>) -> i32 {
    match result {
        Ok(code) => code,
        Err(why) => {
            eprintln!("ember: {why}");
            1
        }
    }
}

/// Opens the store at `dir` if there is one; `None` when `dir` does not exist or is an
/// empty directory (nothing was ever saved there), which `note` says on stderr. Never
/// creates a store.
fn open_existing(dir: &Path, note: bool) -> Result<Option<Arc<Store>>, StoreCmdError> {
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if note {
                eprintln!(
                    "ember: no snapshot store at {} (nothing saved there yet)",
                    dir.display()
                );
            }
            return Ok(None);
        }
        Err(source) => {
            return Err(StoreCmdError::Access {
                dir: dir.to_path_buf(),
                source,
            })
        }
    };
    if !meta.is_dir() {
        return Err(StoreCmdError::NotADirectory {
            dir: dir.to_path_buf(),
        });
    }
    let looks_like_store = dir.join("manifests").is_dir() || dir.join("packs").is_dir();
    if !looks_like_store {
        let empty = std::fs::read_dir(dir)
            .map_err(|source| StoreCmdError::Access {
                dir: dir.to_path_buf(),
                source,
            })?
            .next()
            .is_none();
        if empty {
            if note {
                eprintln!(
                    "ember: the snapshot store {} is empty (nothing saved there yet)",
                    dir.display()
                );
            }
            return Ok(None);
        }
        return Err(StoreCmdError::NotAStore {
            dir: dir.to_path_buf(),
        });
    }
    ember_sandbox::defaults::open_store(dir)
        .map(Some)
        .map_err(|e| StoreCmdError::Open(Box::new(e)))
}

// ---- ember snapshots ----

/// One line of `ember snapshots`.
fn cells(info: &SnapshotInfo) -> [String; 6] {
    [
        info.id.clone(),
        info.created.clone(),
        format_mib(info.memory_bytes),
        info.vcpus.map_or_else(|| "-".into(), |v| v.to_string()),
        info.parent.clone().unwrap_or_else(|| "-".into()),
        info.disks.to_string(),
    ]
}

fn list(dir: &Path, as_json: bool) -> Result<i32, StoreCmdError> {
    let mut rows = Vec::new();
    let mut failed = 0usize;
    if let Some(store) = open_existing(dir, true)? {
        let ids = store
            .list_manifests()
            .map_err(store_error("list the snapshots in", dir))?;
        for id in ids {
            match store.load_manifest(&id) {
                Ok(m) => rows.push(snapshot_info(&m)),
                Err(e) => {
                    failed += 1;
                    eprintln!("ember: snapshot {id:?} cannot be read: {e}");
                }
            }
        }
    }
    if as_json {
        let text = pretty(&rows);
        println!("{text}");
    } else if !rows.is_empty() {
        print!("{}", table(&rows));
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

/// The rows as a table with a header, columns aligned, numbers right-aligned.
fn table(rows: &[SnapshotInfo]) -> String {
    const HEADER: [&str; 6] = ["ID", "CREATED (UTC)", "MEMORY", "VCPUS", "PARENT", "DISKS"];
    const RIGHT: [bool; 6] = [false, false, true, true, false, true];
    let cells: Vec<[String; 6]> = rows.iter().map(cells).collect();
    let mut widths = HEADER.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: [&str; 6]| {
        let mut out = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if RIGHT[i] {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if i + 1 < row.len() {
                    out.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(HEADER);
    for row in &cells {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out
}

fn delete(dir: &Path, id: &str) -> Result<i32, StoreCmdError> {
    let not_found = || StoreCmdError::NoSnapshot {
        id: id.to_string(),
        dir: dir.to_path_buf(),
    };
    let Some(store) = open_existing(dir, false)? else {
        return Err(not_found());
    };
    match store.delete_manifest(id) {
        Ok(()) => {
            println!(
                "deleted snapshot {id}; `ember store gc` reclaims the objects no other \
                 snapshot uses"
            );
            Ok(0)
        }
        Err(StoreError::Manifest(ManifestError::NotFound { .. })) => Err(not_found()),
        Err(source) => Err(StoreCmdError::Delete {
            id: id.to_string(),
            source: Box::new(source),
        }),
    }
}

// ---- ember store stats ----

fn stats(dir: &Path, as_json: bool) -> Result<i32, StoreCmdError> {
    let s = match open_existing(dir, true)? {
        Some(store) => store
            .stats()
            .map_err(store_error("compute the statistics of", dir))?,
        None => StoreStats::default(),
    };
    if as_json {
        let value = json!({
            "store": dir.display().to_string(),
            "snapshots": s.manifests,
            "logical_bytes": s.logical_bytes,
            "stored_bytes": s.stored_bytes,
            "unique_objects": s.unique_objects,
            "packs": s.packs,
            "zero_pages": s.zero_pages,
            "dedup_ratio": s.dedup_ratio,
        });
        let text = pretty(&value);
        println!("{text}");
    } else {
        println!("store:          {}", dir.display());
        println!("snapshots:      {}", s.manifests);
        println!("logical bytes:  {}", bytes_and_mib(s.logical_bytes));
        println!("stored bytes:   {}", bytes_and_mib(s.stored_bytes));
        println!("unique objects: {}", s.unique_objects);
        println!("packs:          {}", s.packs);
        println!(
            "zero pages:     {} ({} not stored)",
            s.zero_pages,
            format_mib(s.zero_pages * 4096)
        );
        println!("dedup ratio:    {:.2}x (logical / stored)", s.dedup_ratio);
    }
    Ok(0)
}

// ---- ember store verify ----

fn problem_kind(kind: ProblemKind) -> &'static str {
    match kind {
        ProblemKind::UnreadablePack => "unreadable pack",
        ProblemKind::CorruptObject => "corrupt object",
        ProblemKind::MissingObject => "missing object",
        ProblemKind::BadManifest => "bad manifest",
        ProblemKind::BadMap => "bad map",
    }
}

/// One line naming everything known about a problem.
fn describe_problem(p: &Problem) -> String {
    let mut out = problem_kind(p.kind).to_string();
    if let Some(h) = &p.hash {
        out.push_str(&format!(" {h}"));
    }
    if let Some(pack) = &p.pack {
        out.push_str(&format!(" in pack {}", pack.display()));
    }
    if let Some(m) = &p.manifest {
        out.push_str(&format!(" (snapshot {m:?})"));
    }
    out.push_str(&format!(": {}", p.detail));
    out
}

fn verify(dir: &Path, as_json: bool) -> Result<i32, StoreCmdError> {
    let report = match open_existing(dir, true)? {
        Some(store) => store.verify().map_err(store_error("verify", dir))?,
        None => VerifyReport::default(),
    };
    if as_json {
        let problems: Vec<Value> = report
            .problems
            .iter()
            .map(|p| {
                json!({
                    "kind": problem_kind(p.kind),
                    "hash": p.hash.map(|h| h.to_hex()),
                    "pack": p.pack.as_ref().map(|p| p.display().to_string()),
                    "snapshot": p.manifest,
                    "detail": p.detail,
                })
            })
            .collect();
        let value = json!({
            "store": dir.display().to_string(),
            "clean": report.is_clean(),
            "packs_checked": report.packs_checked,
            "objects_checked": report.objects_checked,
            "bytes_checked": report.bytes_checked,
            "snapshots_checked": report.manifests_checked,
            "orphan_packs": report.orphan_packs,
            "problems": problems,
        });
        let text = pretty(&value);
        println!("{text}");
    } else {
        for p in &report.problems {
            println!("{}", describe_problem(p));
        }
        println!(
            "checked {} packs, {} objects ({}), {} snapshots: {}",
            report.packs_checked,
            report.objects_checked,
            format_mib_unit(report.bytes_checked),
            report.manifests_checked,
            if report.is_clean() {
                "all good".to_string()
            } else {
                format!("{} problems", report.problems.len())
            }
        );
        if !report.orphan_packs.is_empty() {
            println!(
                "{} packs without an index (a running or crashed writer's; `ember store gc` \
                 removes those of crashed writers): {}",
                report.orphan_packs.len(),
                report.orphan_packs.join(", ")
            );
        }
    }
    if report.is_clean() {
        Ok(0)
    } else {
        eprintln!(
            "ember: the snapshot store {} has {} problems",
            dir.display(),
            report.problems.len()
        );
        Ok(1)
    }
}

// ---- ember store gc ----

fn remote_gc(url: &str, grace_s: u64, as_json: bool) -> Result<i32, StoreCmdError> {
    let remote_error = |source| StoreCmdError::Remote {
        url: url.to_string(),
        source: Box::new(source),
    };
    let remote = ember_remote::Remote::open(url, Default::default()).map_err(remote_error)?;
    let options = ember_remote::RemoteGcOptions {
        grace: std::time::Duration::from_secs(grace_s),
    };
    let report = remote.gc(&options).map_err(remote_error)?;
    if as_json {
        let value = json!({
            "remote": url,
            "snapshots": report.manifests,
            "unreadable_manifests": report.unreadable,
            "packs_kept": report.packs_kept,
            "packs_in_grace": report.packs_in_grace,
            "packs_removed": report.packs_removed,
            "bytes_removed": report.bytes_removed,
        });
        let text = pretty(&value);
        println!("{text}");
    } else {
        println!(
            "{url}: {} snapshots; {} packs kept, {} unnamed kept for the {grace_s} s grace, {} \
             removed ({})",
            report.manifests,
            report.packs_kept,
            report.packs_in_grace,
            report.packs_removed,
            bytes_and_mib(report.bytes_removed)
        );
        for why in &report.unreadable {
            println!("  unreadable manifest skipped: {why}");
        }
    }
    Ok(0)
}

fn gc(dir: &Path, as_json: bool) -> Result<i32, StoreCmdError> {
    let report = match open_existing(dir, true)? {
        Some(store) => store
            .gc()
            .map_err(store_error("collect the garbage of", dir))?,
        None => GcReport::default(),
    };
    if as_json {
        let value = json!({
            "store": dir.display().to_string(),
            "snapshots": report.manifests,
            "live_objects": report.live_objects,
            "packs_kept": report.packs_kept,
            "packs_deleted": report.packs_deleted,
            "packs_rewritten": report.packs_rewritten,
            "objects_copied": report.objects_copied,
            "objects_removed": report.objects_removed,
            "bytes_removed": report.bytes_removed,
            "bytes_written": report.bytes_written,
            "bytes_reclaimed": report.bytes_removed.saturating_sub(report.bytes_written),
            "orphans_removed": report.orphans_removed,
            "orphans_skipped": report.orphans_skipped,
            "temps_removed": report.temps_removed,
            "packs_unreadable": report.packs_unreadable,
            "packs_with_corrupt_objects": report.packs_with_corrupt_objects,
            "manifests_quarantined": report.manifests_quarantined,
        });
        let text = pretty(&value);
        println!("{text}");
    } else {
        println!(
            "traced {} snapshots: {} live objects",
            report.manifests, report.live_objects
        );
        println!(
            "removed {} objects: {} packs deleted, {} rewritten ({} live objects copied), {} kept",
            report.objects_removed,
            report.packs_deleted,
            report.packs_rewritten,
            report.objects_copied,
            report.packs_kept
        );
        if report.orphans_removed + report.orphans_skipped + report.temps_removed > 0 {
            println!(
                "removed {} packs left by crashed writers ({} in use left alone) and {} \
                 temporary files",
                report.orphans_removed, report.orphans_skipped, report.temps_removed
            );
        }
        println!(
            "reclaimed {} ({} removed, {} written by rewrites)",
            format_mib_unit(report.bytes_removed.saturating_sub(report.bytes_written)),
            format_mib_unit(report.bytes_removed),
            format_mib_unit(report.bytes_written)
        );
    }
    for id in &report.manifests_quarantined {
        eprintln!(
            "ember: gc moved the corrupt snapshot {id} to the store's quarantine/ (it cannot \
             be restored; its objects were collected)"
        );
    }
    let skipped = report.packs_unreadable.len() + report.packs_with_corrupt_objects.len();
    if skipped > 0 {
        for id in &report.packs_unreadable {
            eprintln!("ember: gc left the unreadable pack {id} alone (see `ember store verify`)");
        }
        for id in &report.packs_with_corrupt_objects {
            eprintln!(
                "ember: gc left the pack {id} alone: a live object in it is corrupt (see \
                 `ember store verify`)"
            );
        }
    }
    Ok(0)
}

// ---- formatting ----

/// `bytes` in MiB: a whole number when exact, else with two decimals.
fn format_mib(bytes: u64) -> String {
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format_mib_unit(bytes)
    }
}

/// `bytes` in MiB with two decimals.
fn format_mib_unit(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / MIB as f64)
}

fn bytes_and_mib(bytes: u64) -> String {
    format!("{bytes} ({})", format_mib_unit(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_service::snapshots::format_utc;

    #[test]
    fn mib() {
        assert_eq!(format_mib(256 << 20), "256 MiB");
        assert_eq!(format_mib(0), "0 MiB");
        assert_eq!(format_mib(64 * 4096), "0.25 MiB");
        assert_eq!(format_mib_unit(3 << 19), "1.50 MiB");
    }

    #[test]
    fn table_aligns_columns() {
        let rows = [
            SnapshotInfo {
                id: "base".into(),
                name: None,
                created: format_utc(0),
                created_unix_ms: 0,
                memory_bytes: 256 << 20,
                memory_mib: 256.0,
                vcpus: Some(2),
                parent: None,
                disks: 0,
                network: false,
                memory_materialised: None,
                remote: None,
                local: None,
                remote_error: None,
            },
            SnapshotInfo {
                id: "a-longer-id".into(),
                name: None,
                created: format_utc(1_700_000_000_000),
                created_unix_ms: 1_700_000_000_000,
                memory_bytes: 1024 << 20,
                memory_mib: 1024.0,
                vcpus: None,
                parent: Some("base".into()),
                disks: 12,
                network: true,
                memory_materialised: None,
                remote: None,
                local: None,
                remote_error: None,
            },
        ];
        let t = table(&rows);
        let expected = "\
ID           CREATED (UTC)           MEMORY  VCPUS  PARENT  DISKS
base         1970-01-01T00:00:00Z   256 MiB      2  -           0
a-longer-id  2023-11-14T22:13:20Z  1024 MiB      -  base       12
";
        assert_eq!(t, expected);
    }
}
