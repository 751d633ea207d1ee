//! `ember files ls|stat|rm|mv|watch SANDBOX:/path` and the folder copies of `ember cp -r`
//! (a host folder into a sandbox as a tar upload, a sandbox's folder out as a tar download,
//! extracted here so that no entry leaves the destination).

use std::io::Write;
use std::path::Path;

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::Method;
use serde_json::Value;

use ember_agent::tarball::{self, ExtractOptions};
use ember_client::files::{DirListing, FileEntry, RenameBody, TarExtracted, WatchRecord};
use ember_client::{empty_body, encode_query, typed_body, ApiClient, ApiClientError};

use crate::remote::{finish, runtime, split_remote, ServiceArgs};

#[derive(clap::Args, Debug)]
pub struct FilesArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(subcommand)]
    pub action: FilesAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum FilesAction {
    /// List a folder: type, mode, size, modified (UTC), name.
    Ls {
        /// SANDBOX:/folder
        target: String,
        /// Most entries to list (the service's default: 1000).
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Describe a path (a symlink is not followed); exits 1 when nothing is there.
    Stat {
        /// SANDBOX:/path
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove files, symlinks or empty folders (`-r`: folders and all under them).
    Rm {
        #[arg(short, long)]
        recursive: bool,
        /// SANDBOX:/path (repeatable; the same sandbox or others).
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Rename SANDBOX:/from to /to (or SANDBOX:/to) in the same sandbox.
    Mv {
        /// Replace an existing destination.
        #[arg(short, long)]
        force: bool,
        from: String,
        to: String,
    },
    /// Print changes under a folder as they happen (NDJSON with `--json`) until interrupted.
    Watch {
        /// Watch the folders under it too.
        #[arg(short, long)]
        recursive: bool,
        #[arg(long)]
        json: bool,
        /// SANDBOX:/folder
        target: String,
    },
}

fn remote_path(spec: &str) -> Result<(&str, &str), ApiClientError> {
    split_remote(spec).ok_or_else(|| {
        ApiClientError::Http(format!(
            "{spec:?} is not SANDBOX:/absolute/path (a sandbox id, a colon, a guest path)"
        ))
    })
}

fn parse<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiClientError> {
    serde_json::from_value(value).map_err(|e| {
        ApiClientError::Http(format!(
            "the service's answer is not what ember expects: {e}"
        ))
    })
}

/// One `ls` line: `d 755      4096 2026-01-02 03:04:05 name -> target`.
fn ls_line(entry: &FileEntry) -> String {
    let kind = match entry.entry_type {
        ember_client::files::EntryType::File => '-',
        ember_client::files::EntryType::Dir => 'd',
        ember_client::files::EntryType::Symlink => 'l',
        ember_client::files::EntryType::Other => '?',
    };
    let when = ember_service::snapshots::format_utc(entry.mtime_unix_ms.max(0) as u64)
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string();
    let mut line = format!(
        "{kind} {:>4} {:>12} {when} {}",
        entry.mode, entry.size, entry.name
    );
    if let Some(target) = &entry.target {
        line.push_str(&format!(" -> {target}"));
    }
    line
}

pub fn run(args: FilesArgs) -> i32 {
    let client = args.service.client();
    finish(runtime().block_on(async {
        match args.action {
            FilesAction::Ls {
                target,
                limit,
                json,
            } => {
                let (id, path) = remote_path(&target)?;
                let mut uri = format!("/sandboxes/{id}/files/list?path={}", encode_query(path));
                if let Some(limit) = limit {
                    uri.push_str(&format!("&limit={limit}"));
                }
                let answer = client.json(Method::GET, &uri, empty_body()).await?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&answer).unwrap_or_default()
                    );
                    return Ok(0);
                }
                let listing: DirListing = parse(answer)?;
                for entry in &listing.entries {
                    println!("{}", ls_line(entry));
                }
                if listing.truncated {
                    eprintln!(
                        "ember: {path} has more entries than the {} listed (--limit)",
                        listing.entries.len()
                    );
                }
                Ok(0)
            }
            FilesAction::Stat { target, json } => {
                let (id, path) = remote_path(&target)?;
                let uri = format!("/sandboxes/{id}/files/stat?path={}", encode_query(path));
                match client.json(Method::GET, &uri, empty_body()).await {
                    Ok(answer) if json => {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&answer).unwrap_or_default()
                        );
                        Ok(0)
                    }
                    Ok(answer) => {
                        println!("{}", ls_line(&parse(answer)?));
                        Ok(0)
                    }
                    Err(ApiClientError::Api { status: 404, .. }) => {
                        eprintln!("ember: {path}: no such file or folder in {id}");
                        Ok(1)
                    }
                    Err(e) => Err(e),
                }
            }
            FilesAction::Rm { recursive, targets } => {
                let mut code = 0;
                for target in &targets {
                    let (id, path) = remote_path(target)?;
                    let uri = format!(
                        "/sandboxes/{id}/files?path={}&recursive={recursive}",
                        encode_query(path)
                    );
                    if let Err(e) = client.send(Method::DELETE, &uri, empty_body()).await {
                        eprintln!("ember: {target}: {e}");
                        code = 1;
                    }
                }
                Ok(code)
            }
            FilesAction::Mv { force, from, to } => {
                let (id, from_path) = remote_path(&from)?;
                let to_path = match split_remote(&to) {
                    Some((to_id, _)) if to_id != id => {
                        return Err(ApiClientError::Http(format!(
                            "{from} and {to} are in different sandboxes: `ember files mv` renames \
                             within one"
                        )))
                    }
                    Some((_, path)) => path,
                    None => to.as_str(),
                };
                let body = RenameBody {
                    from: from_path.to_string(),
                    to: to_path.to_string(),
                    overwrite: force,
                };
                let uri = format!("/sandboxes/{id}/files/rename");
                client.json(Method::POST, &uri, typed_body(&body)).await?;
                Ok(0)
            }
            FilesAction::Watch {
                recursive,
                json,
                target,
            } => watch(&client, &target, recursive, json).await,
        }
    }))
}

async fn watch(
    client: &ApiClient,
    target: &str,
    recursive: bool,
    json: bool,
) -> Result<i32, ApiClientError> {
    let (id, path) = remote_path(target)?;
    let uri = format!(
        "/sandboxes/{id}/files/watch?path={}&recursive={recursive}",
        encode_query(path)
    );
    let mut body = client
        .send(Method::GET, &uri, empty_body())
        .await?
        .into_body();
    let mut pending: Vec<u8> = Vec::new();
    let mut stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiClientError::Http(format!("the watch broke off: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let shown = if json {
                String::from_utf8_lossy(&line).trim_end().to_string()
            } else {
                let Ok(record) = serde_json::from_slice::<WatchRecord>(&line) else {
                    continue;
                };
                let kind = serde_json::to_value(record.event)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                match (&record.from, record.dropped, &record.message) {
                    (Some(from), _, _) => format!("{kind} {from} -> {}", record.path),
                    (_, Some(dropped), _) => format!("{kind} {dropped} events lost"),
                    (_, _, Some(message)) => format!("{kind} {message}"),
                    _ => format!("{kind} {}", record.path),
                }
            };
            if writeln!(stdout, "{shown}")
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return Ok(0); // Whoever read our output is gone.
            }
        }
    }
    Ok(0)
}

/// Sends what a blocking writer writes to an async channel, a chunk at a time.
struct ChannelWriter(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload ended"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `ember cp -r HOST_DIR SANDBOX:/dir`: the folder's content as a tar archive, extracted
/// under `/dir` (created if missing).
pub async fn copy_dir_in(
    client: &ApiClient,
    source: &Path,
    id: &str,
    path: &str,
) -> Result<TarExtracted, ApiClientError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let root = source.to_path_buf();
    let archiver = tokio::task::spawn_blocking(move || {
        let errors = tx.clone();
        let written = tarball::write_tree(
            &root,
            std::io::BufWriter::with_capacity(64 << 10, ChannelWriter(tx)),
        )
        .and_then(|(summary, mut out)| {
            out.flush()
                .map_err(|source| tarball::TarError::Write { source })?;
            Ok(summary)
        });
        if let Err(e) = &written {
            // Breaking the body makes the service refuse the upload.
            let _ = errors.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
        written
    });
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|item| item.map(|chunk| chunk.map(Frame::data)))
    });
    let body = BodyExt::boxed(StreamBody::new(stream));
    let uri = format!("/sandboxes/{id}/files/tar?path={}", encode_query(path));
    let answer = client.json(Method::PUT, &uri, body).await;
    let archived = archiver
        .await
        .map_err(|e| ApiClientError::Http(format!("the archiving thread failed: {e}")))?;
    if let Err(e) = archived {
        return Err(ApiClientError::Http(format!(
            "cannot archive {}: {e}",
            source.display()
        )));
    }
    parse(answer?)
}

/// Reads what an async channel receives, on a blocking thread.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    chunk: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

/// `ember cp -r SANDBOX:/dir HOST_DIR`: the sandbox's folder as a tar archive, extracted
/// under `destination` (created if missing). An entry that would leave it is refused; no
/// set-uid bit survives.
pub async fn copy_dir_out(
    client: &ApiClient,
    id: &str,
    path: &str,
    destination: &Path,
) -> Result<ember_agent::protocol::TarSummary, ApiClientError> {
    let uri = format!("/sandboxes/{id}/files/tar?path={}", encode_query(path));
    let mut body = client
        .send(Method::GET, &uri, empty_body())
        .await?
        .into_body();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let dest = destination.to_path_buf();
    let extractor = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader {
            rx,
            chunk: Bytes::new(),
        };
        let extracted = tarball::extract(&mut reader, &dest, ExtractOptions { mode_mask: 0o777 });
        // Whatever follows the archive's end marker is read and dropped.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
        extracted
    });
    while let Some(frame) = body.frame().await {
        let item = frame
            .map(|f| f.into_data().unwrap_or_default())
            .map_err(|e| std::io::Error::other(format!("the download broke off: {e}")));
        let failed = item.is_err();
        if tx.send(item).await.is_err() || failed {
            break; // The extraction ended (an error it reports), or the download broke.
        }
    }
    drop(tx);
    extractor
        .await
        .map_err(|e| ApiClientError::Http(format!("the extracting thread failed: {e}")))?
        .map_err(|e| {
            ApiClientError::Http(format!(
                "extracting {id}:{path} into {}: {e}",
                destination.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_client::files::EntryType;

    #[test]
    fn ls_lines_show_type_mode_size_time_and_target() {
        let entry = FileEntry {
            name: "link".into(),
            name_base64: None,
            entry_type: EntryType::Symlink,
            size: 4,
            mode: "777".into(),
            mtime_unix_ms: 1_700_000_000_123,
            target: Some("/etc".into()),
        };
        assert_eq!(
            ls_line(&entry),
            "l  777            4 2023-11-14 22:13:20 link -> /etc"
        );
    }

    #[test]
    fn files_commands_take_sandbox_paths() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            files: FilesArgs,
        }
        let cli = Cli::try_parse_from(["ember", "rm", "-r", "sb-1:/tmp/a", "sb-1:/tmp/b"]).unwrap();
        assert!(matches!(
            cli.files.action,
            FilesAction::Rm { recursive: true, ref targets } if targets.len() == 2
        ));
        assert!(remote_path("sb-1:relative").is_err());
        assert_eq!(remote_path("sb-1:/x").unwrap(), ("sb-1", "/x"));
    }
}
