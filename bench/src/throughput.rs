//! Data rates on a running sandbox: files through the API and the agent (virtio-vsock), and
//! the guest's own O_DIRECT reads and writes of its disk (virtio-block).

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Method;

use ember_client::{empty_body, encode_query};

use crate::report::{Better, Figure};
use crate::service::{self, Api, CallError};
use crate::{step, BenchError};

/// Data rates on a running sandbox, each the median of `runs`: a file streamed out of and into
/// the guest through the API (the agent over virtio-vsock), and the guest reading its rootfs and
/// writing a file to it with O_DIRECT (virtio-block, past the guest's page cache).
pub(crate) async fn throughput(
    api: &Api,
    id: &str,
    quick: bool,
    runs: u32,
    figures: &mut Vec<Figure>,
) -> Result<(), BenchError> {
    let mib: u64 = if quick { 16 } else { 64 };
    let path = "/tmp/ember-bench-blob";
    api.exec(
        id,
        "sh",
        &["-c", &format!("head -c {} /dev/zero > {path}", mib << 20)],
    )
    .await
    .map_err(step("writing the file to stream out"))?;
    let mut out_rates = Vec::new();
    let mut in_rates = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let got = api
            .0
            .send(
                Method::GET,
                &format!("/sandboxes/{id}/files?path={}", encode_query(path)),
                empty_body(),
            )
            .await
            .map_err(service::call("file download".into()))
            .map_err(step("file download"))?
            .into_body()
            .collect()
            .await
            .map_err(|source| CallError::Body {
                call: "file download".into(),
                source,
            })
            .map_err(step("file download"))?
            .to_bytes()
            .len() as u64;
        if got != mib << 20 {
            return Err(step("file download")(CallError::Implausible(format!(
                "{got} bytes arrived, not {}",
                mib << 20
            ))));
        }
        out_rates.push(mib as f64 / t.elapsed().as_secs_f64());
        let body = Full::new(Bytes::from(vec![0x5au8; (mib << 20) as usize]))
            .map_err(|never| match never {})
            .boxed();
        let t = Instant::now();
        api.0
            .send(
                Method::PUT,
                &format!(
                    "/sandboxes/{id}/files?path={}",
                    encode_query("/tmp/ember-bench-up")
                ),
                body,
            )
            .await
            .map_err(service::call("file upload".into()))
            .map_err(step("file upload"))?;
        in_rates.push(mib as f64 / t.elapsed().as_secs_f64());
    }
    figures.push(Figure::new(
        "throughput.vsock_out_mib_s",
        &format!("file out of the guest ({mib} MiB, API + vsock)"),
        "MiB/s",
        Better::Higher,
        out_rates,
    ));
    figures.push(Figure::new(
        "throughput.vsock_in_mib_s",
        &format!("file into the guest ({mib} MiB, API + vsock)"),
        "MiB/s",
        Better::Higher,
        in_rates,
    ));

    // GNU dd reports "N bytes … copied, S s, R MB/s" on stderr; the seconds are the guest's.
    let mut read_rates = Vec::new();
    let mut write_rates = Vec::new();
    for _ in 0..runs {
        for (rates, script) in [
            (
                &mut read_rates,
                format!("dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct 2>&1"),
            ),
            (
                &mut write_rates,
                format!(
                    "dd if=/dev/zero of=/root/ember-bench-dd bs=1M count={mib} oflag=direct \
                     conv=fsync 2>&1; rm -f /root/ember-bench-dd"
                ),
            ),
        ] {
            let answer = api
                .exec(id, "sh", &["-c", &script])
                .await
                .map_err(step("dd in the guest"))?;
            let secs =
                dd_seconds(answer["stdout"].as_str().unwrap_or_default()).ok_or_else(|| {
                    step("dd in the guest")(CallError::Missing {
                        what: "dd's time",
                        answer: answer.clone(),
                    })
                })?;
            rates.push(mib as f64 / secs);
        }
    }
    figures.push(Figure::new(
        "throughput.block_read_mib_s",
        &format!("guest reads its rootfs ({mib} MiB, O_DIRECT, virtio-block)"),
        "MiB/s",
        Better::Higher,
        read_rates,
    ));
    figures.push(Figure::new(
        "throughput.block_write_mib_s",
        &format!("guest writes a file ({mib} MiB, O_DIRECT + fsync, virtio-block)"),
        "MiB/s",
        Better::Higher,
        write_rates,
    ));
    Ok(())
}

/// The seconds in GNU dd's summary line (`…, 1.5 s, 44.7 MB/s`).
fn dd_seconds(output: &str) -> Option<f64> {
    let line = output.lines().rev().find(|l| l.contains(" copied, "))?;
    let after = line.split(" copied, ").nth(1)?;
    let secs: f64 = after.split_whitespace().next()?.parse().ok()?;
    (secs > 0.0).then_some(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dd_summaries_give_their_seconds() {
        let out = "64+0 records in\n64+0 records out\n67108864 bytes (67 MB, 64 MiB) copied, 1.52 s, 44.2 MB/s\n";
        assert_eq!(dd_seconds(out), Some(1.52));
        assert_eq!(dd_seconds("dd: failed to open '/dev/vda'"), None);
        assert_eq!(dd_seconds("0 bytes copied, 0 s, 0 B/s"), None);
    }
}
