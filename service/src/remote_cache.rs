//! A bound on the local space snapshots fetched from the remote tier take
//! (`--remote-cache-bytes`): once the snapshots this host fetched (rather than took) add up
//! to more, the least recently restored of them are dropped from the local store (their
//! manifests here; their objects at the next GC). The remote keeps them: a later restore
//! fetches again. Snapshots taken on this host are never dropped, nor the one just fetched,
//! nor a snapshot live sandboxes were restored from (their memory may still be loading
//! from it).
//!
//! What was fetched, how much and when each was last restored is kept in
//! `STATE_DIR/remote-cache.json`, so the bound holds across service restarts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Fetched {
    /// Bytes downloaded for it (objects this host had already are not counted).
    bytes: u64,
    last_used_unix_ms: u64,
}

/// The snapshots fetched from the remote, with the bound on their bytes.
pub struct RemoteCache {
    path: PathBuf,
    bound: Option<u64>,
    fetched: Mutex<BTreeMap<String, Fetched>>,
}

impl RemoteCache {
    /// Loads the record at `path` (a missing or unreadable one starts empty: the bound then
    /// counts only what is fetched from now on).
    pub fn load(path: PathBuf, bound: Option<u64>) -> RemoteCache {
        let fetched = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                log::warn!("{}: unreadable, starting empty: {e}", path.display());
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        RemoteCache {
            path,
            bound,
            fetched: Mutex::new(fetched),
        }
    }

    fn save(&self, fetched: &BTreeMap<String, Fetched>) {
        let written = serde_json::to_vec(fetched)
            .map_err(std::io::Error::other)
            .and_then(|json| crate::access::write_private(&self.path, &json));
        if let Err(e) = written {
            log::warn!("cannot save {}: {e}", self.path.display());
        }
    }

    /// Notes a restore of snapshot `id`, if it was fetched.
    pub fn touch(&self, id: &str) {
        let mut fetched = self.fetched.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = fetched.get_mut(id) {
            entry.last_used_unix_ms = crate::sandbox::unix_ms();
            self.save(&fetched);
        }
    }

    /// Forgets snapshot `id` (deleted here).
    pub fn forget(&self, id: &str) {
        let mut fetched = self.fetched.lock().unwrap_or_else(|p| p.into_inner());
        if fetched.remove(id).is_some() {
            self.save(&fetched);
        }
    }
}

/// The fetched snapshots to drop, least recently used first, until the rest fit `bound`;
/// never one of `keep`.
fn over_bound(fetched: &BTreeMap<String, Fetched>, bound: u64, keep: &[String]) -> Vec<String> {
    let mut total: u64 = fetched.values().map(|f| f.bytes).sum();
    let mut by_age: Vec<(&String, &Fetched)> = fetched.iter().collect();
    by_age.sort_by_key(|(id, f)| (f.last_used_unix_ms, id.as_str()));
    let mut victims = Vec::new();
    for (id, f) in by_age {
        if total <= bound {
            break;
        }
        if keep.contains(id) {
            continue;
        }
        total -= f.bytes;
        victims.push(id.clone());
    }
    victims
}

/// Records that snapshot `id` was fetched (`bytes` downloaded) and is now local, then drops
/// what the bound no longer allows.
pub async fn record_fetched(state: &Arc<AppState>, id: &str, bytes: u64) {
    let Some(cache) = state.remote.as_ref().map(|tier| &tier.cache) else {
        return;
    };
    let victims = {
        let mut fetched = cache.fetched.lock().unwrap_or_else(|p| p.into_inner());
        fetched.insert(
            id.to_string(),
            Fetched {
                bytes,
                last_used_unix_ms: crate::sandbox::unix_ms(),
            },
        );
        let victims = match cache.bound {
            Some(bound) => {
                // The one just fetched is about to be restored.
                let keep: Vec<String> = fetched
                    .keys()
                    .filter(|k| {
                        k.as_str() == id
                            || !crate::snapshots::live_sandboxes_restored_from(state, k).is_empty()
                    })
                    .cloned()
                    .collect();
                over_bound(&fetched, bound, &keep)
            }
            None => Vec::new(),
        };
        for victim in &victims {
            fetched.remove(victim);
        }
        cache.save(&fetched);
        victims
    };
    for victim in victims {
        let store = state.store.clone();
        let owned = victim.clone();
        match tokio::task::spawn_blocking(move || store.delete_manifest(&owned)).await {
            Ok(Ok(())) => log::info!(
                "snapshot {victim}: dropped from this host to keep fetched snapshots within \
                 --remote-cache-bytes (the remote has it)"
            ),
            Ok(Err(e)) => log::warn!("snapshot {victim}: cannot drop it: {e}"),
            Err(e) => log::warn!("snapshot {victim}: dropping it ended: {e}"),
        }
    }
    state.gc.request();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(bytes: u64, last_used_unix_ms: u64) -> Fetched {
        Fetched {
            bytes,
            last_used_unix_ms,
        }
    }

    #[test]
    fn the_least_recently_used_go_first_and_kept_ones_never() {
        let fetched: BTreeMap<String, Fetched> = [
            ("old".to_string(), entry(40, 1)),
            ("older-but-in-use".to_string(), entry(40, 0)),
            ("new".to_string(), entry(40, 3)),
            ("mid".to_string(), entry(40, 2)),
        ]
        .into();
        let keep = vec!["older-but-in-use".to_string(), "new".to_string()];
        assert_eq!(over_bound(&fetched, 160, &keep), Vec::<String>::new());
        assert_eq!(over_bound(&fetched, 120, &keep), vec!["old".to_string()]);
        assert_eq!(
            over_bound(&fetched, 0, &keep),
            vec!["old".to_string(), "mid".to_string()]
        );
    }

    #[test]
    fn the_record_survives_a_restart_and_a_damaged_one_starts_empty() {
        let dir = std::env::temp_dir().join(format!("ember-remote-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("remote-cache.json");
        let cache = RemoteCache::load(path.clone(), Some(10));
        {
            let mut fetched = cache.fetched.lock().unwrap();
            fetched.insert("s".into(), entry(5, 1));
            cache.save(&fetched);
        }
        cache.touch("s");
        let again = RemoteCache::load(path.clone(), Some(10));
        let s = again.fetched.lock().unwrap()["s"];
        assert_eq!(s.bytes, 5);
        assert!(s.last_used_unix_ms > 1);
        again.forget("s");
        assert!(RemoteCache::load(path.clone(), None)
            .fetched
            .lock()
            .unwrap()
            .is_empty());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(RemoteCache::load(path, None)
            .fetched
            .lock()
            .unwrap()
            .is_empty());
        std::fs::remove_dir_all(dir).ok();
    }
}
