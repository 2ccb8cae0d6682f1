//! The bench's chart (`latency.svg`): one small panel per figure a person compares across
//! transports (latency, server CPU and memory, bytes and requests per delivery), each with
//! its unit, a labelled axis with ticks, and the value on every bar; a legend for the
//! colours and for the two shades of the latency bars.

use std::fmt::Write as _;

use super::PhaseResult;
use crate::message::TransportKind;

/// How a panel's axis maps values.
#[derive(Debug, Clone, Copy)]
enum Scale {
    /// From zero to a rounded-up maximum.
    Linear,
    /// Decades from `min` to `max`.
    Log { min: f64, max: f64 },
}

/// One panel: a title with its unit, and per result a value (and a lighter second value
/// behind it, for p99).
struct Panel {
    title: &'static str,
    scale: Scale,
    values: Vec<Option<(f64, Option<f64>)>>,
}

const PANEL_W: f64 = 300.0;
const PANEL_H: f64 = 200.0;
const AXIS_W: f64 = 54.0;

/// The colour of a transport, as the lab draws it.
pub(super) fn colour(transport: &str) -> &'static str {
    match transport.parse() {
        Ok(TransportKind::Ws) => "#2f6fdb",
        Ok(TransportKind::Sse) => "#2e9d5b",
        Ok(TransportKind::Longpoll) => "#b7791f",
        Ok(TransportKind::Stream) => "#6b46c1",
        Ok(TransportKind::DsSse) => "#0e7c86",
        Ok(TransportKind::DsLongpoll) => "#c05621",
        Ok(TransportKind::Poll) | Err(_) => "#9b2c2c",
    }
}

/// A round number at or above `value`: 1, 2 or 5 times a power of ten.
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let power = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|v| *v >= value)
        .unwrap_or(10.0 * power)
}

/// A figure as an axis or bar label: no more digits than it needs.
fn short(value: f64) -> String {
    if value == 0.0 {
        "0".into()
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        let text = format!("{value:.1}");
        text.trim_end_matches(".0").to_owned()
    } else {
        let text = format!("{value:.4}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

impl Panel {
    /// Where `value` sits, from 0 (the axis's bottom) to 1 (its top).
    fn position(&self, value: f64, top: f64) -> f64 {
        match self.scale {
            Scale::Linear => (value / top).clamp(0.0, 1.0),
            Scale::Log { min, max } => ((value.max(min).log10() - min.log10())
                / (max.log10() - min.log10()))
            .clamp(0.0, 1.0),
        }
    }

    /// The axis's ticks and its top value.
    fn ticks(&self) -> (Vec<f64>, f64) {
        match self.scale {
            Scale::Linear => {
                let most = self
                    .values
                    .iter()
                    .flatten()
                    .map(|(v, second)| second.unwrap_or(*v).max(*v))
                    .fold(0.0, f64::max);
                let top = nice_ceiling(most);
                ((0..=4).map(|i| top * i as f64 / 4.0).collect(), top)
            }
            Scale::Log { min, max } => {
                let mut ticks = Vec::new();
                let mut tick = min;
                while tick <= max * 1.0001 {
                    ticks.push(tick);
                    tick *= 10.0;
                }
                (ticks, max)
            }
        }
    }

    fn draw(&self, out: &mut String, x0: f64, y0: f64, labels: &[String], colours: &[&str]) {
        let plot_x = x0 + AXIS_W;
        let plot_w = PANEL_W - AXIS_W - 10.0;
        let base = y0 + PANEL_H - 36.0;
        let plot_h = PANEL_H - 66.0;
        let _ = writeln!(
            out,
            r#"<text x="{x0:.1}" y="{:.1}" font-weight="bold">{}</text>"#,
            y0 + 16.0,
            self.title
        );
        let (ticks, top) = self.ticks();
        for tick in ticks {
            let y = base - self.position(tick, top) * plot_h;
            let _ = writeln!(
                out,
                r##"<line x1="{plot_x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e2e6ea"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10" fill="#555">{}</text>"##,
                plot_x + plot_w,
                plot_x - 4.0,
                y + 3.0,
                short(tick)
            );
        }
        let _ = writeln!(
            out,
            r##"<line x1="{plot_x:.1}" y1="{base:.1}" x2="{:.1}" y2="{base:.1}" stroke="#888"/>"##,
            plot_x + plot_w
        );
        let slot = plot_w / self.values.len().max(1) as f64;
        for (i, value) in self.values.iter().enumerate() {
            let x = plot_x + slot * i as f64;
            let centre = x + slot / 2.0;
            let _ = writeln!(
                out,
                r#"<text x="{centre:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                base + 13.0,
                labels[i]
            );
            let Some((main, second)) = value else {
                let _ = writeln!(
                    out,
                    r##"<text x="{centre:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#888">n/a</text>"##,
                    base - 4.0
                );
                continue;
            };
            let bar_w = (slot - 8.0).max(2.0);
            let mut bar = |value: f64, opacity: f64| {
                let h = self.position(value, top) * plot_h;
                let _ = writeln!(
                    out,
                    r#"<rect x="{:.1}" y="{:.1}" width="{bar_w:.1}" height="{h:.1}" fill="{}" opacity="{opacity}"/>"#,
                    x + 4.0,
                    base - h,
                    colours[i]
                );
                base - h
            };
            let mut label_y = bar(*main, 1.0);
            if let Some(second) = second {
                label_y = label_y.min(bar(*second, 0.4));
                bar(*main, 1.0);
            }
            let text = match second {
                Some(second) => format!("{}/{}", short(*main), short(*second)),
                None => short(*main),
            };
            let _ = writeln!(
                out,
                r#"<text x="{centre:.1}" y="{:.1}" text-anchor="middle" font-size="9">{text}</text>"#,
                (label_y - 3.0).max(y0 + 28.0)
            );
        }
    }
}

/// The chart of a run's results.
pub(super) fn svg(results: &[PhaseResult]) -> String {
    let labels = labels(results);
    let colours: Vec<&str> = results.iter().map(|r| colour(&r.transport)).collect();
    let panels = panels(results);
    let columns = 3;
    let mut out = header(panels.len(), columns);
    for (i, panel) in panels.iter().enumerate() {
        let x = 10.0 + PANEL_W * (i % columns) as f64;
        let y = 10.0 + PANEL_H * (i / columns) as f64;
        panel.draw(&mut out, x, y, &labels, &colours);
    }
    // The legend, in the free slot.
    legend(&mut out, results, panels.len(), columns);
    out.push_str("</svg>\n");
    out
}

/// The label under each bar: the transport, and the link it ran behind, if any.
fn labels(results: &[PhaseResult]) -> Vec<String> {
    results
        .iter()
        .map(|r| match &r.link {
            Some(link) => format!("{}@{link}", r.transport),
            None => r.transport.clone(),
        })
        .collect()
}

/// The panels, in the order they are laid out: latency, server CPU, server memory, bytes and
/// requests per delivery. A figure that needs a delivery is n/a for a result without any.
fn panels(results: &[PhaseResult]) -> [Panel; 5] {
    let delivered = |r: &PhaseResult| r.deliveries > 0;
    [
        Panel {
            title: "latency p50 / p99, ms (log)",
            scale: Scale::Log {
                min: 0.01,
                max: 10_000.0,
            },
            values: results
                .iter()
                .map(|r| delivered(r).then_some((r.latency_ms.p50, Some(r.latency_ms.p99))))
                .collect(),
        },
        Panel {
            title: "server CPU per delivery, µs",
            scale: Scale::Linear,
            values: results
                .iter()
                .map(|r| {
                    let server = r.server.as_ref()?;
                    delivered(r).then_some((server.cpu_us_per_delivery, None))
                })
                .collect(),
        },
        Panel {
            title: "server memory per subscriber, KiB",
            scale: Scale::Linear,
            values: results
                .iter()
                .map(|r| Some((r.server.as_ref()?.rss_per_subscriber_kib.max(0.0), None)))
                .collect(),
        },
        Panel {
            title: "bytes per delivery (wire if linked, else body)",
            scale: Scale::Linear,
            values: results
                .iter()
                .map(|r| {
                    delivered(r).then_some((
                        r.wire_bytes_per_delivery.unwrap_or(r.bytes_per_delivery),
                        None,
                    ))
                })
                .collect(),
        },
        Panel {
            title: "requests per delivery (log)",
            scale: Scale::Log {
                min: 0.0001,
                max: 10.0,
            },
            values: results
                .iter()
                .map(|r| delivered(r).then_some((r.requests_per_delivery, None)))
                .collect(),
        },
    ]
}

/// The SVG's opening: sized for `panels` panels in rows of `columns`, plus the legend's slot
/// (a row of its own when the panels fill their last row).
fn header(panels: usize, columns: usize) -> String {
    let rows = panels.div_ceil(columns).max(1) + usize::from(panels.is_multiple_of(columns));
    let width = PANEL_W * columns as f64 + 20.0;
    let height = PANEL_H * rows as f64 + 20.0;
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="#fff"/>
"##
    )
}

/// The legend, in grid slot `slot` (the first after the panels): each transport's colour in
/// order of first appearance, the two shades of the latency bars, and what n/a means.
fn legend(out: &mut String, results: &[PhaseResult], slot: usize, columns: usize) {
    let (lx, ly) = (
        10.0 + PANEL_W * (slot % columns) as f64,
        10.0 + PANEL_H * (slot / columns) as f64,
    );
    let _ = writeln!(
        out,
        r#"<text x="{lx:.1}" y="{:.1}" font-weight="bold">legend</text>"#,
        ly + 16.0
    );
    let mut seen: Vec<&str> = Vec::new();
    for r in results {
        if !seen.contains(&r.transport.as_str()) {
            seen.push(&r.transport);
        }
    }
    for (i, transport) in seen.iter().enumerate() {
        let y = ly + 36.0 + 18.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{y:.1}">{transport}</text>"#,
            y - 10.0,
            colour(transport),
            lx + 18.0
        );
    }
    let y = ly + 36.0 + 18.0 * seen.len() as f64 + 8.0;
    let _ = writeln!(
        out,
        r##"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="#555"/><rect x="{:.1}" y="{:.1}" width="12" height="12" fill="#555" opacity="0.4"/><text x="{:.1}" y="{y:.1}">latency: solid p50, light p99</text>"##,
        y - 10.0,
        lx + 14.0,
        y - 10.0,
        lx + 32.0
    );
    let _ = writeln!(
        out,
        r##"<text x="{lx:.1}" y="{:.1}" font-size="10" fill="#555">n/a: not measured (no server PID, or nothing delivered)</text>"##,
        y + 20.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_end_on_round_numbers_and_labels_stay_short() {
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(0.0031), 0.005);
        assert_eq!(nice_ceiling(120.0), 200.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
        assert_eq!(short(2.0), "2");
        assert_eq!(short(2.25), "2.2");
        assert_eq!(short(0.0010), "0.001");
        assert_eq!(short(1500.0), "1500");
    }
}
