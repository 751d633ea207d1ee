//! `ember metrics ID`: one sample of a sandbox's CPU, memory, disk and network, as the
//! service measures it (`GET /sandboxes/{id}/metrics`).

use hyper::Method;

use ember_client::empty_body;

use crate::remote::{finish, runtime, IdArgs};

/// `ember metrics ID`: one sample of the sandbox's CPU, memory, disk and network.
pub fn metrics(args: IdArgs) -> i32 {
    let client = args.service.client();
    finish(runtime().block_on(async {
        let uri = format!("/sandboxes/{}/metrics", args.id);
        let m = client.json(Method::GET, &uri, empty_body()).await?;
        let mib = |v: &serde_json::Value| v.as_f64().map(|b| format!("{:.1} MiB", b / 1048576.0));
        let guest = &m["guest"];
        if guest.is_object() {
            println!(
                "guest: {} vCPU, cpu user {} ms system {} ms idle {} ms; memory {} used of {}; load {} {} {}; {} processes; up {:.1} s",
                guest["cpus"], guest["cpu_user_ms"], guest["cpu_system_ms"], guest["cpu_idle_ms"],
                mib(&guest["memory_used_bytes"]).unwrap_or_default(),
                mib(&guest["memory_total_bytes"]).unwrap_or_default(),
                guest["load_1m"], guest["load_5m"], guest["load_15m"], guest["processes"],
                guest["uptime_s"].as_f64().unwrap_or(0.0)
            );
        } else {
            println!("guest: {}", m["guest_error"].as_str().unwrap_or("-"));
        }
        let host = &m["host"];
        println!(
            "host:  vmm pid {}, cpu {:.3} s, rss {}",
            host["vmm_pid"],
            host["cpu_usage_us"].as_f64().unwrap_or(0.0) / 1e6,
            mib(&host["rss_bytes"]).unwrap_or_else(|| "-".into())
        );
        let disk = &host["io"]["disk"];
        if disk.is_object() {
            println!(
                "disk:  read {} ({} ops), written {} ({} ops)",
                mib(&disk["read_bytes"]).unwrap_or_default(), disk["read_ops"],
                mib(&disk["write_bytes"]).unwrap_or_default(), disk["write_ops"]
            );
        }
        let net = &host["io"]["net"];
        if net.is_object() {
            println!(
                "net:   rx {} ({} frames), tx {} ({} frames)",
                mib(&net["rx_bytes"]).unwrap_or_default(), net["rx_frames"],
                mib(&net["tx_bytes"]).unwrap_or_default(), net["tx_frames"]
            );
        }
        Ok(0)
    }))
}
