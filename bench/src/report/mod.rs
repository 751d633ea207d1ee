//! The benchmark report: a stable JSON document, a Markdown table, SVG charts, and the
//! comparison of two reports.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

mod charts;

/// The JSON schema's name and version; bumped when a field changes meaning.
pub const SCHEMA: &str = "ember-bench/1";

/// Errors writing or reading a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read the report {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an ember-bench report ({reason})")]
    Parse { path: String, reason: String },
    #[error("drawing the chart {path}: {reason}")]
    Chart { path: String, reason: String },
}

/// Which way a figure improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

/// One measured figure: the median and spread of its samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    /// Stable key, e.g. `restore.prefetch.first_exec_ms`.
    pub name: String,
    /// What it measures, for people.
    pub label: String,
    pub unit: String,
    pub better: Better,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
    /// For start-up figures: how many times sooner than the cold boot's same figure.
    pub ratio_to_cold: Option<f64>,
    /// The bound this figure is compared against, when there is one (e.g. memcpy).
    pub bound: Option<String>,
}

/// The median of `samples` (the mean of the middle two for an even count); `None` if empty.
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

impl Figure {
    pub fn new(name: &str, label: &str, unit: &str, better: Better, samples: Vec<f64>) -> Figure {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let median = median(&samples).unwrap_or(f64::NAN);
        Figure {
            name: name.to_string(),
            label: label.to_string(),
            unit: unit.to_string(),
            better,
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            samples,
            ratio_to_cold: None,
            bound: None,
        }
    }
}

/// Host memory of K clones of one snapshot running at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DensityPoint {
    /// How the clones' memory arrived (`file`, `prefetch`; empty in older reports).
    #[serde(default)]
    pub mode: String,
    pub clones: u32,
    /// Resident memory of all their VMM processes (guest RAM they touched included) / K.
    pub rss_mib_per_clone: f64,
    /// Proportional set size / K (shared pages split between the processes).
    pub pss_mib_per_clone: f64,
}

/// A restored sandbox's page faults over time, from its restore through its first exec and
/// the bench's look at it (`GET /sandboxes/{id}/faults`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultSeries {
    /// The restore mode (`lazy`, `prefetch`).
    pub mode: String,
    pub bucket_ms: u64,
    /// Pages served on demand per bucket since the restore started serving memory.
    pub counts: Vec<u32>,
    /// Pages the working-set prefetch loaded up front.
    pub prefetched: u64,
}

/// Where one kind of start spends its time: each step's median time since the request
/// (`GET /sandboxes/{id}` timelines), in the order reached.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartTimeline {
    /// `cold` or `restore.MODE`.
    pub start: String,
    /// (step, median milliseconds since the request).
    pub steps: Vec<(String, f64)>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    /// Where it ran: hardware KVM or the lab (nested KVM under QEMU TCG).
    pub environment: String,
    pub ember_version: String,
    pub started_unix_ms: u64,
    pub quick: bool,
    pub runs: u32,
    pub guest_memory_mib: u32,
    pub figures: Vec<Figure>,
    pub density: Vec<DensityPoint>,
    /// Reports written before fault series existed have none.
    #[serde(default)]
    pub fault_series: Vec<FaultSeries>,
    /// Reports written before timelines existed have none.
    #[serde(default)]
    pub timelines: Vec<StartTimeline>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn figure(&self, name: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.name == name)
    }

    pub fn load(path: &Path) -> Result<Report, ReportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let report: Report = serde_json::from_str(&text).map_err(|e| ReportError::Parse {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if report.schema != SCHEMA {
            return Err(ReportError::Parse {
                path: path.display().to_string(),
                reason: format!("schema {:?}, this ember writes {SCHEMA:?}", report.schema),
            });
        }
        Ok(report)
    }

    /// The Markdown table of every figure, headed by the environment.
    /// Each start's steps (rows) by kind of start (columns), in median ms since the request.
    fn timeline_table(&self, out: &mut String) {
        if self.timelines.is_empty() {
            return;
        }
        let mut steps: Vec<&str> = Vec::new();
        for t in &self.timelines {
            for (step, _) in &t.steps {
                if !steps.contains(&step.as_str()) {
                    steps.push(step);
                }
            }
        }
        let _ = write!(
            out,
            "\nWhere each start spends its time (median ms since the request)\n\n| step |"
        );
        for t in &self.timelines {
            let _ = write!(out, " {} |", t.start);
        }
        let _ = write!(out, "\n|---|");
        for _ in &self.timelines {
            let _ = write!(out, "---:|");
        }
        let _ = writeln!(out);
        for step in steps {
            let _ = write!(out, "| {step} |");
            for t in &self.timelines {
                match t.steps.iter().find(|(s, _)| s == step) {
                    Some((_, ms)) => {
                        let _ = write!(out, " {} |", num(*ms));
                    }
                    None => {
                        let _ = write!(out, " – |");
                    }
                }
            }
            let _ = writeln!(out);
        }
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# ember-bench\n");
        let _ = writeln!(
            out,
            "Environment: **{}**. {} runs per figure{}; guest memory {} MiB; ember {}.\n",
            self.environment,
            self.runs,
            if self.quick { " (quick)" } else { "" },
            self.guest_memory_mib,
            self.ember_version
        );
        let _ = writeln!(out, "| figure | median | min – max | vs cold boot |");
        let _ = writeln!(out, "|---|---:|---:|---:|");
        for f in &self.figures {
            let ratio = f
                .ratio_to_cold
                .map(|r| format!("{r:.2}x sooner"))
                .unwrap_or_default();
            let bound = f
                .bound
                .as_ref()
                .map(|b| format!(" (bound: {b})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "| {}{bound} | {} {} | {} – {} | {ratio} |",
                f.label,
                num(f.median),
                f.unit,
                num(f.min),
                num(f.max)
            );
        }
        self.timeline_table(&mut out);
        if !self.density.is_empty() {
            let _ = writeln!(
                out,
                "\n| restore | clones running | host RSS per clone | PSS per clone |\n|---|---:|---:|---:|"
            );
            for d in &self.density {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.1} MiB | {:.1} MiB |",
                    if d.mode.is_empty() { "-" } else { &d.mode },
                    d.clones,
                    d.rss_mib_per_clone,
                    d.pss_mib_per_clone
                );
            }
        }
        if !self.fault_series.is_empty() {
            let _ = writeln!(
                out,
                "\n| restore | pages prefetched | pages faulted in on demand | last fault after |\n|---|---:|---:|---:|"
            );
            for f in &self.fault_series {
                let total: u64 = f.counts.iter().map(|&n| u64::from(n)).sum();
                let _ = writeln!(
                    out,
                    "| {} | {} | {total} | {} ms |",
                    f.mode,
                    f.prefetched,
                    f.counts.len() as u64 * f.bucket_ms
                );
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out);
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }

    /// Writes `report.json`, `report.md` and the charts into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), ReportError> {
        let write_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| ReportError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(write_err(dir))?;
        let json = serde_json::to_string_pretty(self).unwrap_or_default();
        let path = dir.join("report.json");
        std::fs::write(&path, json + "\n").map_err(write_err(&path))?;
        let path = dir.join("report.md");
        std::fs::write(&path, self.markdown()).map_err(write_err(&path))?;
        self.restore_chart(&dir.join("restore-latency.svg"))?;
        self.density_chart(&dir.join("memory-per-clone.svg"))?;
        self.faults_chart(&dir.join("faults-after-restore.svg"))?;
        Ok(())
    }
}

fn short_env(environment: &str) -> &str {
    if environment.starts_with("the lab") {
        "the lab"
    } else {
        environment
    }
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A figure that got worse than the threshold allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Regression {
    pub name: String,
    pub old: f64,
    pub new: f64,
    /// How much worse, in percent (positive).
    pub worse_pct: f64,
}

/// Figures present in both reports whose median moved the wrong way by more than
/// `threshold_pct` percent.
pub fn regressions(old: &Report, new: &Report, threshold_pct: f64) -> Vec<Regression> {
    let mut out = Vec::new();
    for f in &new.figures {
        let Some(o) = old.figure(&f.name) else {
            continue;
        };
        if !(o.median.is_finite() && f.median.is_finite()) || o.median <= 0.0 {
            continue;
        }
        let change_pct = (f.median - o.median) / o.median * 100.0;
        let worse_pct = match f.better {
            Better::Lower => change_pct,
            Better::Higher => -change_pct,
        };
        if worse_pct > threshold_pct {
            out.push(Regression {
                name: f.name.clone(),
                old: o.median,
                new: f.median,
                worse_pct,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> Report {
        let mut cold = Figure::new(
            "cold.first_exec_ms",
            "cold boot: first exec done",
            "ms",
            Better::Lower,
            vec![700.0, 900.0, 800.0],
        );
        cold.ratio_to_cold = Some(1.0);
        let mut warm = Figure::new(
            "restore.prefetch.first_exec_ms",
            "prefetch restore: first exec done",
            "ms",
            Better::Lower,
            vec![80.0, 60.0],
        );
        warm.ratio_to_cold = Some(800.0 / 70.0);
        Report {
            schema: SCHEMA.into(),
            environment: "the lab (nested KVM under QEMU TCG)".into(),
            ember_version: "0.1.0".into(),
            started_unix_ms: 1,
            quick: true,
            runs: 3,
            guest_memory_mib: 256,
            figures: vec![
                Figure::new(
                    "cold.ready_ms",
                    "cold boot: agent ready",
                    "ms",
                    Better::Lower,
                    vec![500.0],
                ),
                cold,
                Figure::new(
                    "restore.prefetch.ready_ms",
                    "prefetch restore: agent ready",
                    "ms",
                    Better::Lower,
                    vec![40.0],
                ),
                warm,
                Figure::new(
                    "store.dedup_ratio",
                    "logical / stored bytes",
                    "x",
                    Better::Higher,
                    vec![4.0],
                ),
            ],
            density: vec![
                DensityPoint {
                    mode: "file".into(),
                    clones: 1,
                    rss_mib_per_clone: 40.0,
                    pss_mib_per_clone: 38.0,
                },
                DensityPoint {
                    mode: "file".into(),
                    clones: 4,
                    rss_mib_per_clone: 30.0,
                    pss_mib_per_clone: 20.0,
                },
            ],
            fault_series: vec![
                FaultSeries {
                    mode: "lazy".into(),
                    bucket_ms: 20,
                    counts: vec![300, 120, 0, 40, 5],
                    prefetched: 0,
                },
                FaultSeries {
                    mode: "prefetch".into(),
                    bucket_ms: 20,
                    counts: vec![0, 0, 0, 0, 0, 0, 0, 0, 3, 2],
                    prefetched: 1200,
                },
            ],
            timelines: vec![
                StartTimeline {
                    start: "cold".into(),
                    steps: vec![
                        ("request_accepted".into(), 0.0),
                        ("agent_answered".into(), 3000.0),
                    ],
                },
                StartTimeline {
                    start: "restore.file".into(),
                    steps: vec![
                        ("request_accepted".into(), 0.0),
                        ("memory_mapped".into(), 120.0),
                    ],
                },
            ],
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn medians_and_spread() {
        let f = Figure::new("x", "x", "ms", Better::Lower, vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!((f.median, f.min, f.max), (2.5, 1.0, 10.0));
        let f = Figure::new("x", "x", "ms", Better::Lower, vec![3.0, 1.0, 2.0]);
        assert_eq!(f.median, 2.0);
        assert!(Figure::new("x", "x", "ms", Better::Lower, vec![])
            .median
            .is_nan());
    }

    #[test]
    fn report_files_and_charts_render() {
        let dir = std::env::temp_dir().join(format!("ember-bench-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let report = sample_report();
        report.write(&dir).unwrap();
        let again = Report::load(&dir.join("report.json")).unwrap();
        assert_eq!(again.figures.len(), report.figures.len());
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(md.contains("the lab (nested KVM under QEMU TCG)"), "{md}");
        assert!(
            md.contains(
                "| prefetch restore: first exec done | 70.00 ms | 60.00 – 80.00 | 11.43x sooner |"
            ),
            "{md}"
        );
        assert!(md.contains("| lazy | 0 | 465 | 100 ms |"), "{md}");
        assert!(md.contains("| prefetch | 1200 | 5 | 200 ms |"), "{md}");
        // The timelines: a row per step, a column per kind of start, – where a start has no
        // such step.
        assert!(md.contains("| step | cold | restore.file |"), "{md}");
        assert!(md.contains("| agent_answered | 3000 | – |"), "{md}");
        assert!(md.contains("| memory_mapped | – | 120 |"), "{md}");
        assert!(md.contains("| file | 4 | 30.0 MiB | 20.0 MiB |"), "{md}");
        for (chart, words) in [
            (
                "restore-latency.svg",
                ["cold", "prefetch", "first exec done"],
            ),
            (
                "memory-per-clone.svg",
                ["RSS (file)", "PSS (file)", "clones of one snapshot"],
            ),
            (
                "faults-after-restore.svg",
                [
                    "lazy",
                    "prefetch (1200 pages prefetched)",
                    "ms since the restore began",
                ],
            ),
        ] {
            let svg = std::fs::read_to_string(dir.join(chart)).unwrap();
            assert!(svg.len() > 2000, "{chart} is {} bytes", svg.len());
            assert!(
                svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
                "{chart}"
            );
            for w in words {
                assert!(svg.contains(w), "{chart} lacks {w:?}");
            }
            // Data drawn, not just axes: filled bars or a polyline with points.
            assert!(
                svg.matches("<rect").count() >= 4 || svg.contains("<polyline"),
                "{chart}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn comparison_flags_only_real_regressions() {
        let old = sample_report();
        let mut new = sample_report();
        assert!(regressions(&old, &new, 10.0).is_empty());
        // 30 % slower first exec after restore, 50 % less dedup: both regressions.
        new.figures[3].median *= 1.3;
        new.figures[4].median /= 2.0;
        // 5 % slower cold boot: under the threshold.
        new.figures[0].median *= 1.05;
        let found = regressions(&old, &new, 10.0);
        let names: Vec<&str> = found.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["restore.prefetch.first_exec_ms", "store.dedup_ratio"]
        );
        assert!((found[0].worse_pct - 30.0).abs() < 1e-9);
        assert!((found[1].worse_pct - 50.0).abs() < 1e-9);
        // Faster is never a regression.
        new.figures[3].median = 1.0;
        assert_eq!(regressions(&old, &new, 10.0).len(), 1);
    }

    #[test]
    fn a_foreign_json_is_refused() {
        let path =
            std::env::temp_dir().join(format!("ember-bench-foreign-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"schema":"other/1"}"#).unwrap();
        let err = Report::load(&path).unwrap_err().to_string();
        assert!(err.contains("not an ember-bench report"), "{err}");
        let mut r = sample_report();
        r.schema = "ember-bench/0".into();
        std::fs::write(&path, serde_json::to_string(&r).unwrap()).unwrap();
        let err = Report::load(&path).unwrap_err().to_string();
        assert!(err.contains("ember-bench/0"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
