//! `ember images`: the runtime images this host has built, or those a service offers.

use std::path::PathBuf;

use ember_client::images::{ImageInfo, ImageList};
use ember_client::{empty_body, ApiClient};
use hyper::Method;

#[derive(clap::Args, Debug)]
pub struct ImagesArgs {
    /// Ask the service on this socket instead of looking in this host's image cache.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Print JSON (`{"images": [...]}`, as `GET /images` answers).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ImagesArgs) -> i32 {
    let list = match &args.socket {
        Some(socket) => {
            let client = ApiClient::new(socket);
            let answer = crate::remote::runtime()
                .block_on(async { client.json(Method::GET, "/images", empty_body()).await });
            match answer.map(serde_json::from_value::<ImageList>) {
                Ok(Ok(list)) => list,
                Ok(Err(e)) => {
                    eprintln!("ember: the service's image list is malformed: {e}");
                    return 1;
                }
                Err(e) => return crate::remote::finish(Err(e)),
            }
        }
        None => match built_here() {
            Ok(list) => list,
            Err(e) => {
                eprintln!("ember: {e}");
                return 1;
            }
        },
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return 0;
    }
    println!(
        "{:<11} {:<5} {:<16} {:>8}  {:<24} ROOTFS",
        "RUNTIME", "USER", "KEY", "SIZE", "PROVIDES"
    );
    for ImageInfo {
        image,
        rootfs,
        size_bytes,
        default,
    } in &list.images
    {
        let provides: Vec<String> = image
            .provides
            .iter()
            .map(|(name, version)| format!("{name} {version}"))
            .collect();
        println!(
            "{:<11} {:<5} {:<16} {:>7}M  {:<24} {}{}",
            image.runtime,
            image.user,
            if image.key.is_empty() {
                "-"
            } else {
                &image.key
            },
            size_bytes >> 20,
            provides.join(", "),
            rootfs.display(),
            if *default { "  (default)" } else { "" }
        );
    }
    0
}

/// The base rootfs and the newest build of every runtime in this host's cache.
fn built_here() -> Result<ImageList, ember_service::runtimes::RuntimesError> {
    let base = ember_sandbox::defaults::default_rootfs().unwrap_or_default();
    let mut list = ember_service::runtimes::Runtimes::discover(&base, &[], None, None)?.list();
    list.images.retain(|i| i.rootfs.exists());
    Ok(list)
}
