//! The report's SVG charts (plotters): faults over time after a restore, restore latency by
//! mode, and memory per clone.

use std::path::Path;

use plotters::prelude::*;

use super::{short_env, DensityPoint, FaultSeries, Report, ReportError};

impl Report {
    /// Lines: pages faulted in on demand so far, against time since the restore began, per
    /// restore mode (the prefetch line starts after its up-front load).
    pub fn faults_chart(&self, path: &Path) -> Result<(), ReportError> {
        let chart_err = |e: String| ReportError::Chart {
            path: path.display().to_string(),
            reason: e,
        };
        let cumulative: Vec<(&FaultSeries, Vec<(f64, f64)>)> = self
            .fault_series
            .iter()
            .map(|series| {
                let mut total = 0.0;
                let mut points = vec![(0.0, 0.0)];
                for (i, n) in series.counts.iter().enumerate() {
                    total += f64::from(*n);
                    points.push((((i + 1) as u64 * series.bucket_ms) as f64, total));
                }
                (series, points)
            })
            .collect();
        let right = cumulative
            .iter()
            .flat_map(|(_, p)| p.last().map(|l| l.0))
            .fold(100.0, f64::max)
            * 1.05;
        let top = cumulative
            .iter()
            .flat_map(|(_, p)| p.last().map(|l| l.1))
            .fold(10.0, f64::max)
            * 1.15;
        let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| chart_err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Pages faulted in on demand after a restore ({})",
                    short_env(&self.environment)
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..right, 0.0..top)
            .map_err(|e| chart_err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("ms since the restore began")
            .y_desc("pages (4 KiB) so far")
            .draw()
            .map_err(|e| chart_err(e.to_string()))?;
        let colors = [RGBColor(0x4c, 0x78, 0xa8), RGBColor(0xf5, 0x85, 0x18)];
        for (i, (series, points)) in cumulative.iter().enumerate() {
            let color = colors[i % colors.len()];
            let label = if series.prefetched > 0 {
                format!("{} ({} pages prefetched)", series.mode, series.prefetched)
            } else {
                series.mode.clone()
            };
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| chart_err(e.to_string()))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 14, y)], color.stroke_width(2))
                });
        }
        if !cumulative.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| chart_err(e.to_string()))?;
        }
        root.present().map_err(|e| chart_err(e.to_string()))
    }

    /// Bars: time to agent ready and to the first exec done, cold boot vs each restore mode.
    pub fn restore_chart(&self, path: &Path) -> Result<(), ReportError> {
        let starts = ["cold", "restore.eager", "restore.lazy", "restore.prefetch"];
        let rows: Vec<(&str, f64, f64)> = starts
            .iter()
            .filter_map(|s| {
                let ready = self.figure(&format!("{s}.ready_ms"))?.median;
                let exec = self.figure(&format!("{s}.first_exec_ms"))?.median;
                Some((s.trim_start_matches("restore."), ready, exec))
            })
            .collect();
        // Headroom above the tallest bar for the labels and the legend.
        let top = rows.iter().map(|r| r.2.max(r.1)).fold(1.0, f64::max) * 1.4;
        let chart_err = |e: String| ReportError::Chart {
            path: path.display().to_string(),
            reason: e,
        };
        let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| chart_err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Start to agent ready / first exec done ({})",
                    short_env(&self.environment)
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..(rows.len().max(1) as f64), 0.0..top)
            .map_err(|e| chart_err(e.to_string()))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("ms")
            .draw()
            .map_err(|e| chart_err(e.to_string()))?;
        let bars = |offset: f64, pick: fn(&(&str, f64, f64)) -> f64, color: RGBColor| {
            rows.iter()
                .enumerate()
                .map(move |(i, r)| {
                    let x = i as f64 + offset;
                    Rectangle::new([(x, 0.0), (x + 0.35, pick(r))], color.filled())
                })
                .collect::<Vec<_>>()
        };
        chart
            .draw_series(bars(0.12, |r| r.1, RGBColor(0x4c, 0x78, 0xa8)))
            .map_err(|e| chart_err(e.to_string()))?
            .label("agent ready")
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x, y - 5), (x + 10, y + 5)],
                    RGBColor(0x4c, 0x78, 0xa8).filled(),
                )
            });
        chart
            .draw_series(bars(0.5, |r| r.2, RGBColor(0xf5, 0x85, 0x18)))
            .map_err(|e| chart_err(e.to_string()))?
            .label("first exec done")
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x, y - 5), (x + 10, y + 5)],
                    RGBColor(0xf5, 0x85, 0x18).filled(),
                )
            });
        // Each start's name over its pair of bars (with its first-exec ratio to cold).
        let cold_first = rows.first().map(|r| r.2);
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                let ratio = match cold_first {
                    Some(c) if i > 0 && r.2 > 0.0 => format!(" ({:.1}x)", c / r.2),
                    _ => String::new(),
                };
                Text::new(
                    format!("{}{ratio}", r.0),
                    (i as f64 + 0.1, r.1.max(r.2) + top * 0.03),
                    ("sans-serif", 14),
                )
            }))
            .map_err(|e| chart_err(e.to_string()))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| chart_err(e.to_string()))?;
        root.present().map_err(|e| chart_err(e.to_string()))
    }

    /// Line: host memory per clone as more clones of one snapshot run at once.
    pub fn density_chart(&self, path: &Path) -> Result<(), ReportError> {
        let chart_err = |e: String| ReportError::Chart {
            path: path.display().to_string(),
            reason: e,
        };
        let max_k = self
            .density
            .iter()
            .map(|d| d.clones)
            .max()
            .unwrap_or(1)
            .max(2);
        let top = self
            .density
            .iter()
            .map(|d| d.rss_mib_per_clone.max(d.pss_mib_per_clone))
            .fold(1.0, f64::max)
            * 1.2;
        let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| chart_err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Host memory per clone vs clones running ({})",
                    short_env(&self.environment)
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(1u32..max_k, 0.0..top)
            .map_err(|e| chart_err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("clones of one snapshot")
            .y_desc("MiB per clone")
            .draw()
            .map_err(|e| chart_err(e.to_string()))?;
        let mut modes: Vec<&str> = Vec::new();
        for d in &self.density {
            if !modes.contains(&d.mode.as_str()) {
                modes.push(&d.mode);
            }
        }
        let palette = [
            RGBColor(0x4c, 0x78, 0xa8),
            RGBColor(0xf5, 0x85, 0x18),
            RGBColor(0x54, 0xa2, 0x4b),
            RGBColor(0xe4, 0x57, 0x56),
        ];
        let series = modes.iter().flat_map(|mode| {
            [
                (
                    *mode,
                    "RSS",
                    (|d: &DensityPoint| d.rss_mib_per_clone) as fn(&DensityPoint) -> f64,
                ),
                (*mode, "PSS", |d: &DensityPoint| d.pss_mib_per_clone),
            ]
        });
        for (i, (mode, what, pick)) in series.enumerate() {
            let color = palette[i % palette.len()];
            let label = if mode.is_empty() {
                what.to_string()
            } else {
                format!("{what} ({mode})")
            };
            let points: Vec<(u32, f64)> = self
                .density
                .iter()
                .filter(|d| d.mode == mode)
                .map(|d| (d.clones, pick(d)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| chart_err(e.to_string()))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 14, y)], color.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map_err(|e| chart_err(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| chart_err(e.to_string()))?;
        root.present().map_err(|e| chart_err(e.to_string()))
    }
}
