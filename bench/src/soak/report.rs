//! A soak's report: whether it passed, its Markdown, its JSON and its curves.

use std::path::Path;

use super::{
    is_judged, is_lab_fault, service_runs, Metric, SoakReport, SoakSample, MIN_JUDGED_RUN,
};
use crate::report::ReportError;

impl SoakReport {
    /// Whether the soak passed: every cycle ran and succeeded (or met the lab's fault),
    /// nothing left behind, nothing growing.
    pub fn passed(&self) -> bool {
        self.failure.is_none()
            && self.failed_cycles.iter().all(|f| f.lab_fault)
            && self.leftovers.is_empty()
            && self.growth.is_empty()
    }

    pub fn markdown(&self) -> String {
        let first = self.samples.first();
        let last = self.samples.last();
        let row = |s: Option<&SoakSample>| {
            s.map_or("- | - | - | - | -".to_string(), |s| {
                format!(
                    "{} | {} | {} | {} | {:.1}",
                    s.open_fds,
                    s.threads,
                    s.rss_kib / 1024,
                    s.store_kib / 1024,
                    s.seconds
                )
            })
        };
        let at_once = if self.streams > 1 {
            format!(", {} at a time", self.streams)
        } else {
            String::new()
        };
        let mut md = format!(
            "# ember soak: {} cycles of create, exec, snapshot, restore, exec, delete{at_once}\n\n\
             Environment: {}. The service process after each cycle:\n\n\
             | after | open fds | threads | RSS MiB | store MiB | cycle s |\n\
             | --- | --- | --- | --- | --- | --- |\n\
             | cycle 1 | {} |\n| cycle {} | {} |\n\n",
            self.cycles,
            self.environment,
            row(first),
            self.samples.len(),
            row(last),
        );
        let runs = service_runs(self.samples.len(), &self.service_starts);
        if runs.len() > 1 {
            let judged: Vec<_> = runs
                .iter()
                .enumerate()
                .filter(|(_, r)| is_judged(r.len(), runs.len()))
                .collect();
            md.push_str(&format!(
                "Run by {} services in turn: the soak was continued (`--soak-resume`) in a new \
                 service {} times, after the machine running it died; the table's first row is \
                 the first service's, its last row the last one's, and growth is judged within \
                 each service's run of at least {MIN_JUDGED_RUN} cycles: runs {} ({} of {} \
                 cycles). Cycles per run: {}.\n\n",
                runs.len(),
                runs.len() - 1,
                judged
                    .iter()
                    .map(|(k, _)| (k + 1).to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                judged.iter().map(|(_, r)| r.len()).sum::<usize>(),
                self.samples.len(),
                runs.iter()
                    .map(|r| r.len().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        if !self.failed_cycles.is_empty() {
            md.push_str(&format!(
                "**{} of {} cycles failed** (each cleaned up, the soak went on):\n\n",
                self.failed_cycles.len(),
                self.samples.len() + self.failed_cycles.len()
            ));
            for f in &self.failed_cycles {
                md.push_str(&format!(
                    "- cycle {}{}: {} (evidence: `{}`)\n",
                    f.cycle + 1,
                    if f.lab_fault {
                        " (the lab's fault: a guest triple fault)"
                    } else {
                        ""
                    },
                    f.error.replace('\n', " "),
                    f.evidence
                ));
            }
            md.push('\n');
        }
        if let Some(failure) = &self.failure {
            md.push_str(&format!(
                "**Stopped after {} cycles**: {failure}\n\n",
                self.samples.len()
            ));
        }
        md.push_str(&format!(
            "Growth beyond noise: {}.\n\nLeft behind: {}.\n",
            if self.growth.is_empty() {
                "none".to_string()
            } else {
                self.growth.join("; ")
            },
            if self.leftovers.is_empty() && self.networked {
                "nothing (no VMM processes, sandbox folders, sockets, cgroups, mounts, \
                 temporary files in the store, network namespaces, veths or NAT table; every \
                 sandbox had an egress network)"
                    .to_string()
            } else if self.leftovers.is_empty() {
                "nothing (no VMM processes, sandbox folders, sockets, cgroups, mounts or \
                 temporary files in the store; sandboxes had no network: the service did not \
                 run as root)"
                    .to_string()
            } else {
                self.leftovers.join("; ")
            }
        ));
        md
    }

    /// Reads the report at `path` to continue or judge it, writing into `out`: the evidence
    /// files its failed cycles name are copied there (the new report refers to them), and
    /// failed cycles recorded before lab faults were told apart are judged again from their
    /// error and evidence (`in_lab`: this run is in the lab, as the earlier one was).
    pub fn load_into(path: &Path, out: &Path, in_lab: bool) -> Result<SoakReport, ReportError> {
        let bytes = std::fs::read(path).map_err(read_error(path))?;
        let mut report: SoakReport =
            serde_json::from_slice(&bytes).map_err(|e| ReportError::Parse {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let from = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(out).map_err(write_error(out))?;
        for failed in &mut report.failed_cycles {
            // Only a plain file name: the report is input, and must not name other files.
            let name = Path::new(&failed.evidence);
            let evidence = if name.file_name() == Some(name.as_os_str()) {
                std::fs::read_to_string(from.join(name)).unwrap_or_default()
            } else {
                String::new()
            };
            if !evidence.is_empty() && from.join(name) != out.join(name) {
                std::fs::write(out.join(name), &evidence).map_err(write_error(&out.join(name)))?;
            }
            failed.lab_fault |= is_lab_fault(in_lab, &failed.error, &evidence);
        }
        Ok(report)
    }

    /// Writes `soak.json`, `soak.md` and the curve, `soak.svg`, into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), ReportError> {
        std::fs::create_dir_all(dir).map_err(write_error(dir))?;
        let json = serde_json::to_vec_pretty(self).expect("a soak report serialises to JSON");
        let (json_path, md_path) = (dir.join("soak.json"), dir.join("soak.md"));
        std::fs::write(&json_path, json).map_err(write_error(&json_path))?;
        std::fs::write(&md_path, self.markdown()).map_err(write_error(&md_path))?;
        self.chart(&dir.join("soak.svg"))
    }

    fn chart(&self, path: &Path) -> Result<(), ReportError> {
        use plotters::prelude::*;
        let root = SVGBackend::new(path, (720, 800)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| chart_error(path, e))?;
        let areas = root.split_evenly((4, 1));
        let cycles = self.samples.len().max(2) as u32;
        let series: [(&str, Metric, RGBColor); 4] = [
            (
                "open file descriptors",
                |s| s.open_fds as f64,
                RGBColor(0x4c, 0x78, 0xa8),
            ),
            ("threads", |s| s.threads as f64, RGBColor(0xf5, 0x85, 0x18)),
            (
                "resident MiB",
                |s| s.rss_kib as f64 / 1024.0,
                RGBColor(0x54, 0xa2, 0x4b),
            ),
            (
                "store MiB",
                |s| s.store_kib as f64 / 1024.0,
                RGBColor(0xb2, 0x79, 0xa2),
            ),
        ];
        for (area, (name, pick, color)) in areas.iter().zip(series) {
            let top = self.samples.iter().map(pick).fold(1.0, f64::max) * 1.25;
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!("ember serve: {name} after each soak cycle"),
                    ("sans-serif", 15),
                )
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(56)
                .build_cartesian_2d(1u32..cycles, 0.0..top)
                .map_err(|e| chart_error(path, e))?;
            chart
                .configure_mesh()
                .x_desc("cycle")
                .draw()
                .map_err(|e| chart_error(path, e))?;
            chart
                .draw_series(LineSeries::new(
                    // In the order cycles finished (with several streams, not their numbers').
                    (1u32..).zip(self.samples.iter().map(pick)),
                    color.stroke_width(2),
                ))
                .map_err(|e| chart_error(path, e))?;
        }
        root.present().map_err(|e| chart_error(path, e))
    }
}

fn chart_error(path: &Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Chart {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Read {
        path: path.display().to_string(),
        source,
    }
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Write {
        path: path.display().to_string(),
        source,
    }
}
