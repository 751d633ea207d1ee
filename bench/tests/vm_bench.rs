//! `ember-bench --quick` end to end (`vmtest_*`: hardware KVM or the lab): it starts its own
//! service, measures cold boots and restores, and writes a report whose charts render.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn artifact(var: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set; run VM tests through `cargo xtask test`"))
}

/// Runs `ember-bench ARGS --out /tmp/ember-NAME-PID` on the suite's kernel and rootfs; it must
/// succeed. Returns (the output folder, its stdout, its stderr).
fn bench(name: &str, args: &[&str]) -> (PathBuf, String, String) {
    let out = PathBuf::from(format!("/tmp/ember-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_ember-bench"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .args(["--kernel", &artifact("EMBER_KERNEL")])
        .args(["--rootfs", &artifact("EMBER_ROOTFS")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    eprintln!("{stdout}");
    (out, stdout, stderr)
}

#[test]
fn vmtest_bench_quick_writes_a_report_with_ratios_and_charts() {
    let (out, _, stderr) = bench(
        "bench-test",
        // Two density points per mode: the sweep's 4 and 8 clones add minutes in the lab and
        // test nothing more of the report.
        &[
            "--quick",
            "--runs",
            "1",
            "--remote",
            "moto",
            "--density-clones",
            "1,2",
        ],
    );

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["schema"], "ember-bench/1");
    assert!(
        report["environment"].as_str().unwrap().contains("KVM"),
        "{}",
        report["environment"]
    );
    let figure = |name: &str| -> Value {
        report["figures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no figure {name} in {report}"))
    };
    for name in [
        "cold.ready_ms",
        "cold.first_exec_ms",
        "exec.round_trip_ms",
        "snapshot.full.256mib_ms",
        "snapshot.diff.256mib_ms",
        "restore.eager.first_exec_ms",
        "restore.lazy.first_exec_ms",
        "restore.prefetch.first_exec_ms",
        "store.dedup_ratio",
        "throughput.vsock_out_mib_s",
        "throughput.vsock_in_mib_s",
        "throughput.block_read_mib_s",
        "throughput.block_write_mib_s",
    ] {
        let median = figure(name)["median"].as_f64().unwrap();
        assert!(median.is_finite() && median > 0.0, "{name}: {median}");
    }
    // Each restore's first exec carries its ratio to the cold boot's, consistently computed.
    let cold = figure("cold.first_exec_ms")["median"].as_f64().unwrap();
    for mode in ["eager", "lazy", "prefetch"] {
        let f = figure(&format!("restore.{mode}.first_exec_ms"));
        let ratio = f["ratio_to_cold"].as_f64().unwrap();
        let expected = cold / f["median"].as_f64().unwrap();
        assert!(
            (ratio - expected).abs() < 1e-6,
            "{mode}: {ratio} vs {expected}"
        );
    }
    // Two sandboxes after the same install share most of their bytes.
    assert!(figure("store.dedup_ratio")["median"].as_f64().unwrap() > 2.0);
    // Restores from the remote on an empty host, next to the cold boot; a lazy one downloads
    // less before it is ready than a whole one does in all, a later one of the snapshot
    // fetched by then downloads nothing; the second host's push of the same install uploads
    // little of what the first one did.
    let median = |name: &str| figure(name)["median"].as_f64().unwrap();
    for start in ["remote.lazy", "remote.whole", "remote.warm"] {
        let first = figure(&format!("{start}.first_exec_ms"));
        assert!(first["ratio_to_cold"].as_f64().unwrap() > 0.0, "{first}");
    }
    let whole = median("remote.whole.downloaded_mib");
    assert!(whole > 10.0, "a whole snapshot is {whole} MiB");
    let (before_start, before_ready) = (
        median("remote.lazy.before_start_mib"),
        median("remote.lazy.before_ready_mib"),
    );
    assert!(
        before_start > 0.0 && before_start <= before_ready && before_start < whole,
        "{before_start} MiB before the VMM started, {before_ready} MiB before ready, {whole} \
         MiB whole"
    );
    assert!(median("remote.lazy.downloaded_mib") >= before_ready);
    assert!(median("remote.warm.downloaded_mib") < 0.1);
    let (first, all) = (
        median("remote.upload.first_mib"),
        median("remote.upload.all_mib"),
    );
    assert!(
        first > 10.0 && all < first * 1.5,
        "{first} MiB, then {all} MiB for two"
    );
    // 1 and 2 clones, restored in `file` and in `prefetch` mode.
    let density = report["density"].as_array().unwrap();
    assert_eq!(density.len(), 4, "{density:?}");
    for mode in ["file", "prefetch"] {
        let clones: Vec<u64> = density
            .iter()
            .filter(|d| d["mode"] == mode)
            .map(|d| d["clones"].as_u64().unwrap())
            .collect();
        assert_eq!(clones, [1, 2], "{density:?}");
    }
    assert!(density
        .iter()
        .all(|d| d["rss_mib_per_clone"].as_f64().unwrap() > 1.0));

    // The lazy restore faulted pages in on demand, over time; the prefetch restore loaded its
    // working set up front and faulted (far) less.
    let series = report["fault_series"].as_array().unwrap();
    let of = |mode: &str| -> (u64, u64) {
        let s = series
            .iter()
            .find(|s| s["mode"] == mode)
            .unwrap_or_else(|| panic!("no {mode} fault series in {series:?}"));
        let faults = s["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum();
        (faults, s["prefetched"].as_u64().unwrap())
    };
    let (lazy_faults, lazy_prefetched) = of("lazy");
    let (prefetch_faults, prefetched) = of("prefetch");
    assert!(
        lazy_faults > 100 && lazy_prefetched == 0,
        "lazy: {lazy_faults} faults"
    );
    assert!(
        prefetched > 100 && prefetch_faults < lazy_faults,
        "prefetch: {prefetch_faults} faults after {prefetched} prefetched; lazy {lazy_faults}"
    );

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("prefetch restore: request → first exec done"),
        "{md}"
    );
    for chart in [
        "restore-latency.svg",
        "memory-per-clone.svg",
        "faults-after-restore.svg",
    ] {
        let svg = std::fs::read_to_string(out.join(chart)).unwrap();
        assert!(svg.len() > 2000, "{chart}: {} bytes", svg.len());
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{chart}"
        );
    }
    let svg = std::fs::read_to_string(out.join("restore-latency.svg")).unwrap();
    assert!(
        svg.matches("<rect").count() >= 8,
        "bars for 4 starts x 2 figures"
    );
    // The service it started is gone, and so is its state.
    assert!(!stderr.contains("panicked"), "{stderr}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn vmtest_a_short_soak_leaves_nothing_behind_and_draws_its_curve() {
    // Two at a time: the service under concurrent creates, snapshots, deletes and GCs.
    let (out, stdout, _) = bench("soak-test", &["--soak", "4", "--soak-streams", "2"]);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("soak.json")).unwrap()).unwrap();
    let samples = report["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 4, "{report}");
    assert_eq!(report["streams"], 2, "{report}");
    assert_eq!(report["failure"], Value::Null, "{report}");
    assert!(samples
        .iter()
        .all(|s| s["open_fds"].as_u64().unwrap() > 0 && s["threads"].as_u64().unwrap() > 0));
    assert_eq!(report["leftovers"], serde_json::json!([]), "{report}");
    assert!(stdout.contains("Left behind: nothing"), "{stdout}");
    // As root (the lab) every sandbox had an egress network, and none of it is left.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    assert_eq!(report["networked"], Value::Bool(root), "{report}");
    let svg = std::fs::read_to_string(out.join("soak.svg")).unwrap();
    assert!(
        svg.len() > 2000 && svg.contains("<polyline"),
        "{} bytes",
        svg.len()
    );
    let _ = std::fs::remove_dir_all(&out);
}
