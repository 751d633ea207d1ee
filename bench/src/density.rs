//! Density: host memory per clone with K clones of one snapshot running at once, and the
//! store's growth for snapshots of the same install against their logical size.

use std::path::Path;

use serde_json::json;

use crate::report::{Better, DensityPoint, Figure};
use crate::service::{id_of, Api, CallError};
use crate::{say, step, BenchError};

/// Host memory per clone for `ks` clones at once (1, 2, 4 and 8 by default) in `file` and
/// `prefetch` mode; a point lost twice is a note, not a failed run.
pub(crate) async fn density(api: &Api, ks: &[u32], notes: &mut Vec<String>) -> Vec<DensityPoint> {
    // Density: K clones of the snapshot at once, each having run a command; `file` clones
    // share the page cache of one memory file, `prefetch` ones each hold a copy.
    let mut density = Vec::new();
    for (mode, &k) in ["file", "prefetch"]
        .into_iter()
        .flat_map(|m| ks.iter().map(move |k| (m, k)))
    {
        say(&format!("{k} {mode} clones at once"));
        let mut point = clones_at_once(api, mode, k).await;
        if let Err(why) = &point {
            // A point needs every clone running: one lost (in the lab, most likely to a guest
            // triple fault of the emulated SVM) is measured once more, and said.
            say(&format!(
                "{k} {mode} clones at once failed ({why}); once more"
            ));
            notes.push(format!(
                "{k} {mode} clones at once: measured a second time, the first failed: {why}"
            ));
            point = clones_at_once(api, mode, k).await;
        }
        match point {
            Ok(point) => density.push(point),
            // A point lost twice is said, not hidden, and the rest of the run goes on.
            Err(why) => notes.push(format!("{k} {mode} clones at once: left out: {why}")),
        }
    }
    density
}

/// Host memory per clone of `k` clones of `bench-base` restored in `mode` at once, each
/// having run a command; every clone made is deleted again, whatever happens.
async fn clones_at_once(api: &Api, mode: &str, k: u32) -> Result<DensityPoint, CallError> {
    let mut ids = Vec::new();
    let measured = async {
        let mut pids = Vec::new();
        for _ in 0..k {
            let sb = api
                .create(json!({"snapshot": "bench-base", "restore_mode": mode}))
                .await?;
            ids.push(id_of(&sb)?);
            pids.extend(sb["pid"].as_u64());
        }
        for id in &ids {
            if let Err(e) = api.exec(id, "true", &[]).await {
                let failure = api.sandbox(id).await.unwrap_or_default();
                return Err(CallError::CloneExec {
                    id: id.clone(),
                    source: Box::new(e),
                    failure: failure["failure"].clone(),
                });
            }
        }
        let (rss, pss) = pids.iter().fold((0u64, 0u64), |(r, p), pid| {
            let (r2, p2) = memory_of(*pid as u32);
            (r + r2, p + p2)
        });
        Ok(DensityPoint {
            mode: mode.to_string(),
            clones: k,
            rss_mib_per_clone: rss as f64 / f64::from(k) / 1048576.0,
            pss_mib_per_clone: pss as f64 / f64::from(k) / 1048576.0,
        })
    }
    .await;
    for id in &ids {
        api.delete(id).await?;
    }
    measured
}

/// Resident and proportional memory of a sandbox's VMM, in bytes (0 if it is gone): the
/// process the service started and its children (a jailed VMM runs as the child of a small
/// supervisor).
fn memory_of(pid: u32) -> (u64, u64) {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let pids =
        std::iter::once(pid).chain(children.split_whitespace().filter_map(|c| c.parse().ok()));
    let (mut rss, mut pss) = (0, 0);
    for pid in pids {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024)
        };
        rss += field("Rss:");
        pss += field("Pss:");
    }
    (rss, pss)
}

/// Store growth for N sandboxes snapshotted after the same install, against their logical
/// size.
pub(crate) async fn store_growth(
    api: &Api,
    state: &Path,
    quick: bool,
    figures: &mut Vec<Figure>,
) -> Result<(), BenchError> {
    let n = if quick { 2 } else { 10 };
    say(&format!(
        "{n} sandboxes after the same install, snapshotted"
    ));
    let store_dir = state.join("store");
    let before = dir_bytes(&store_dir);
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("bench-same-{i}");
        api.installed_snapshot(json!({}), &id)
            .await
            .map_err(step("snapshot of an install"))?;
        ids.push(id);
    }
    let logical = logical_bytes(&store_dir, &ids).map_err(step("reading the store"))?;
    let stored = dir_bytes(&store_dir).saturating_sub(before);
    figures.push(Figure::new(
        "store.stored_mib",
        &format!("store growth for {n} snapshots after the same install"),
        "MiB",
        Better::Lower,
        vec![stored as f64 / 1048576.0],
    ));
    figures.push(Figure::new(
        "store.logical_mib",
        &format!("logical size of those {n} snapshots (memory + written disk chunks)"),
        "MiB",
        Better::Lower,
        vec![logical as f64 / 1048576.0],
    ));
    if stored > 0 {
        figures.push(Figure::new(
            "store.dedup_ratio",
            "logical / stored bytes",
            "x",
            Better::Higher,
            vec![logical as f64 / stored as f64],
        ));
    }
    Ok(())
}

/// Bytes the files under `dir` take on disk.
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// What snapshots `ids` would take stored whole: their memory plus their written disk chunks.
fn logical_bytes(store_dir: &Path, ids: &[String]) -> Result<u64, CallError> {
    let store = ember_snapshot_store::Store::open(store_dir)?;
    let mut bytes = 0;
    for id in ids {
        let manifest = store.load_manifest(id)?;
        bytes += manifest.memory.size_bytes;
        for disk in &manifest.disks {
            let map = store.load_disk_map(disk)?;
            bytes += map.chunks.iter().flatten().count() as u64 * u64::from(map.chunk_size);
        }
    }
    Ok(bytes)
}
