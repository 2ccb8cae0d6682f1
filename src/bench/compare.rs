//! `pushhub bench --scenario compare`: every transport on every link and middlebox, with a
//! verdict per cell, written as comparison.md and comparison.svg.
//!
//! A cell works when every message arrived once, in about the time the link allows; it is
//! degraded when messages were lost or repeated, the subscribers did not catch up, or the
//! latency is far above what the link explains (a proxy held it); it is broken when the
//! transport could not be used at all (refused) or most messages never arrived.

use std::fmt::Write as _;

use super::{BenchArgs, PhaseResult, command::command_line};
use crate::link::Link;

/// What a cell's figures say.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every message, once, in about the time the link allows.
    Works,
    /// Usable, but not as it should be; the reason.
    Degraded(String),
    /// Not usable; the reason.
    Broken(String),
}

impl Verdict {
    /// `works`, `degraded`, `broken`.
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Works => "works",
            Verdict::Degraded(_) => "degraded",
            Verdict::Broken(_) => "broken",
        }
    }

    /// Why, when not `works`.
    pub fn reason(&self) -> &str {
        match self {
            Verdict::Works => "",
            Verdict::Degraded(reason) | Verdict::Broken(reason) => reason,
        }
    }
}

/// The latency a cell should show, ms: the link's one-way delay, plus half the poll interval
/// for short polling (a message waits for the next poll).
fn expected_latency_ms(result: &PhaseResult, args: &BenchArgs) -> f64 {
    let delay = result
        .link
        .as_deref()
        .and_then(|l| l.parse::<Link>().ok())
        .map_or(0.0, |l| l.profile.delay.as_secs_f64() * 1000.0);
    let wait = if result.transport == "poll" {
        args.poll_interval.as_secs_f64() * 1000.0 / 2.0
    } else {
        0.0
    };
    delay + wait
}

/// The verdict on one cell.
pub fn verdict(result: &PhaseResult, args: &BenchArgs) -> Verdict {
    if let Some(failure) = &result.failure {
        return Verdict::Broken(failure.clone());
    }
    if result.expected_deliveries == 0 {
        return Verdict::Broken("nothing was published".into());
    }
    let share = result.deliveries as f64 / result.expected_deliveries as f64;
    if share < 0.5 {
        return Verdict::Broken(format!(
            "{:.0}% of the messages arrived before the drain timeout",
            share * 100.0
        ));
    }
    let mut reasons = Vec::new();
    let skipped = result.lost.saturating_sub(result.undelivered);
    if skipped > 0 {
        reasons.push(format!("{skipped} lost"));
    }
    if result.duplicates > 0 {
        reasons.push(format!("{} duplicated", result.duplicates));
    }
    if result.undelivered > 0 {
        reasons.push(format!(
            "{} not delivered by the drain timeout (held on the way, or behind)",
            result.undelivered
        ));
    } else if !result.drained {
        reasons.push("subscribers had not caught up at the drain timeout".into());
    }
    let expected = expected_latency_ms(result, args);
    let p50 = result.latency_ms.p50;
    if p50 > 3.0 * expected + 25.0 {
        reasons.push(format!(
            "p50 {p50:.0} ms where the link explains {expected:.0} ms (held on the way)"
        ));
    }
    if reasons.is_empty() {
        Verdict::Works
    } else {
        Verdict::Degraded(reasons.join("; "))
    }
}

/// The links of a run, in order of first appearance.
fn links(results: &[PhaseResult]) -> Vec<String> {
    let mut links: Vec<String> = Vec::new();
    for r in results {
        let link = r.link.clone().unwrap_or_else(|| "direct".into());
        if !links.contains(&link) {
            links.push(link);
        }
    }
    links
}

/// The transports of a run, in order of first appearance.
fn transports(results: &[PhaseResult]) -> Vec<String> {
    let mut transports: Vec<String> = Vec::new();
    for r in results {
        if !transports.contains(&r.transport) {
            transports.push(r.transport.clone());
        }
    }
    transports
}

fn link_of(result: &PhaseResult) -> &str {
    result.link.as_deref().unwrap_or("direct")
}

/// comparison.md: the command, the table with a verdict per cell, a reading per link.
pub fn markdown(args: &BenchArgs, results: &[PhaseResult]) -> String {
    let mut out = String::from("# pushhub: the push techniques compared on emulated links\n\n");
    let _ = writeln!(out, "Command: `{}`\n", command_line(args));
    let _ = writeln!(
        out,
        "{} subscribers per cell, {} msg/s for {:.1} s, {}-byte payloads; a fresh server per cell. \
The subscribers sit behind the link (a proxy in the bench's process: delay ± jitter each way, \
bandwidth cap, cuts, middleboxes); the publisher posts straight to the server. Latency is publish \
to receipt, so it carries the link. \"wire B/deliv\" is every byte that crossed the link both ways \
(request and response heads, framing, bodies, heartbeats) over the publish and drain window, per \
delivery. \"wire B/deliv (server)\" is what the server counted for the transport (`GET /stats`: body bytes and HTTP heads both ways) over the same window: it misses what clients send on an open connection (WebSocket pongs) and the few bytes a stream opens with (`retry:`, its first `id:`). \"recovery\" is the time from a subscriber noticing a lost connection to being served \
again (subscribers resume from the last id they saw, as pushhub.js does).\n",
        args.subscribers,
        args.rate,
        args.duration.as_secs_f64(),
        args.payload_bytes,
    );
    out.push_str("| link | transport | verdict | p50 ms | p99 ms | lost | dup | cuts | reconnects | recovery p50 ms | req/deliv | wire B/deliv (link) | wire B/deliv (server) | server CPU µs/deliv | why |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in results {
        let v = verdict(r, args);
        let _ = writeln!(
            out,
            "| {} | {} | **{}** | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            link_of(r),
            r.transport,
            v.word(),
            figure(r, r.latency_ms.p50, 1),
            figure(r, r.latency_ms.p99, 1),
            r.lost,
            r.duplicates,
            r.link_cuts.map_or("n/a".into(), |c| c.to_string()),
            r.reconnects,
            r.recovery_ms
                .map_or("n/a".into(), |p| format!("{:.0}", p.p50)),
            figure(r, r.requests_per_delivery, 3),
            r.wire_bytes_per_delivery
                .filter(|_| r.deliveries > 0)
                .map_or("n/a".into(), |b| format!("{b:.0}")),
            r.server_wire_bytes_per_delivery
                .filter(|_| r.deliveries > 0)
                .map_or("n/a".into(), |b| format!("{b:.0}")),
            r.server
                .as_ref()
                .filter(|_| r.deliveries > 0)
                .map_or("n/a".into(), |s| format!("{:.1}", s.cpu_us_per_delivery)),
            v.reason().replace('|', "/"),
        );
    }
    out.push_str("\n## Reading\n\n");
    for line in reading(args, results) {
        let _ = writeln!(out, "- {line}");
    }
    out.push_str("\n![verdict, latency and bytes per cell](comparison.svg)\n");
    out
}

/// A figure of a cell, or `n/a` when nothing was delivered.
fn figure(result: &PhaseResult, value: f64, decimals: usize) -> String {
    if result.deliveries == 0 {
        "n/a".into()
    } else {
        format!("{value:.decimals$}")
    }
}

/// Per link: the lowest latency and the fewest bytes among the cells that work, and what
/// did not.
pub fn reading(args: &BenchArgs, results: &[PhaseResult]) -> Vec<String> {
    let mut lines = Vec::new();
    for link in links(results) {
        let cells: Vec<(&PhaseResult, Verdict)> = results
            .iter()
            .filter(|r| link_of(r) == link)
            .map(|r| (r, verdict(r, args)))
            .collect();
        let working: Vec<&PhaseResult> = cells
            .iter()
            .filter(|(_, v)| *v == Verdict::Works)
            .map(|(r, _)| *r)
            .collect();
        let mut line = format!("**{link}**: ");
        let wire = |r: &PhaseResult| r.wire_bytes_per_delivery.unwrap_or(r.bytes_per_delivery);
        let fastest = tied(&working, |r| r.latency_ms.p50);
        let leanest = tied(&working, wire);
        match (fastest.first(), leanest.first()) {
            (Some(fast), Some(lean)) => {
                let _ = write!(
                    line,
                    "fastest that works: {} (p50 {:.1} ms); fewest bytes: {} ({:.0} B per delivery)",
                    names(&fastest),
                    fast.latency_ms.p50,
                    names(&leanest),
                    wire(lean)
                );
            }
            _ => line.push_str("no transport worked cleanly"),
        }
        for (r, v) in &cells {
            if *v != Verdict::Works {
                let _ = write!(line, "; {} {}: {}", r.transport, v.word(), v.reason());
            }
        }
        line.push('.');
        lines.push(line);
    }
    lines
}

/// The results within 5% of the lowest `figure` (the machine's noise is larger than that),
/// lowest first.
fn tied<'a>(
    results: &[&'a PhaseResult],
    figure: impl Fn(&PhaseResult) -> f64,
) -> Vec<&'a PhaseResult> {
    let Some(best) = results.iter().map(|r| figure(r)).min_by(f64::total_cmp) else {
        return Vec::new();
    };
    let mut tied: Vec<&PhaseResult> = results
        .iter()
        .copied()
        .filter(|r| figure(r) <= best * 1.05)
        .collect();
    tied.sort_by(|a, b| figure(a).total_cmp(&figure(b)));
    tied
}

/// `ws`, `ws and sse`, `ws, sse and stream`.
fn names(results: &[&PhaseResult]) -> String {
    let names: Vec<&str> = results.iter().map(|r| r.transport.as_str()).collect();
    match names.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// comparison.svg: a grid, links down, transports across; each cell coloured by its verdict
/// and showing p50/p99 latency, wire bytes and requests per delivery.
pub fn svg(args: &BenchArgs, results: &[PhaseResult]) -> String {
    let grid = Grid::new(args, results);
    let mut out = grid.header();
    grid.column_heads(&mut out);
    for (row, link) in grid.links.iter().enumerate() {
        grid.row(&mut out, row, link);
    }
    grid.legend(&mut out);
    out.push_str("</svg>\n");
    out
}

/// The width of comparison.svg's column of link names, px.
const LEFT: f64 = 190.0;
/// The height above its first row (title and transport names), px.
const TOP: f64 = 70.0;
/// A cell's width, px.
const CELL_W: f64 = 170.0;
/// A cell's height, px.
const CELL_H: f64 = 76.0;

/// comparison.svg's grid: the run it draws, its links (rows) and its transports (columns),
/// each in order of first appearance.
struct Grid<'a> {
    args: &'a BenchArgs,
    results: &'a [PhaseResult],
    links: Vec<String>,
    transports: Vec<String>,
}

impl<'a> Grid<'a> {
    /// The grid of `results`.
    fn new(args: &'a BenchArgs, results: &'a [PhaseResult]) -> Self {
        Grid {
            args,
            results,
            links: links(results),
            transports: transports(results),
        }
    }

    /// The SVG's opening, sized for the grid, with the title and what a cell shows.
    fn header(&self) -> String {
        let width = LEFT + CELL_W * self.transports.len() as f64 + 20.0;
        let height = TOP + CELL_H * self.links.len() as f64 + 70.0;
        format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="12" y="24" font-size="16" font-weight="bold">Push techniques on emulated links: verdict, latency, bytes</text>
<text x="12" y="44" font-size="11" fill="#555">{} subscribers per cell, {} msg/s for {:.0} s. Each cell: p50 / p99 latency (ms, publish to receipt), wire bytes per delivery (both ways, headers included), requests per delivery.</text>
"##,
            self.args.subscribers,
            self.args.rate,
            self.args.duration.as_secs_f64()
        )
    }

    /// The transports' names above their columns.
    fn column_heads(&self, out: &mut String) {
        for (col, transport) in self.transports.iter().enumerate() {
            let x = LEFT + CELL_W * col as f64 + CELL_W / 2.0;
            let _ = writeln!(
                out,
                r#"<text x="{x}" y="{}" font-size="13" font-weight="bold" text-anchor="middle">{transport}</text>"#,
                TOP - 8.0
            );
        }
    }

    /// Row `row`: the link's name, then its cell for each transport that ran on it.
    fn row(&self, out: &mut String, row: usize, link: &str) {
        let y = TOP + CELL_H * row as f64;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" font-size="12" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            y + CELL_H / 2.0 + 4.0,
            escape(link)
        );
        for (col, transport) in self.transports.iter().enumerate() {
            let Some(r) = self
                .results
                .iter()
                .find(|r| link_of(r) == link && &r.transport == transport)
            else {
                continue;
            };
            let x = LEFT + CELL_W * col as f64;
            self.cell(out, r, x, y);
        }
    }

    /// One cell at (`x`, `y`): a box in its verdict's colour (the reason as its tooltip), and
    /// its figures, or the reason when nothing was delivered.
    fn cell(&self, out: &mut String, r: &PhaseResult, x: f64, y: f64) {
        let v = verdict(r, self.args);
        let fill = match v {
            Verdict::Works => "#c8e6c9",
            Verdict::Degraded(_) => "#ffe0b2",
            Verdict::Broken(_) => "#ffcdd2",
        };
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="{y}" width="{}" height="{}" fill="{fill}" stroke="white" stroke-width="2"><title>{}: {}</title></rect>"#,
            CELL_W,
            CELL_H,
            v.word(),
            escape(v.reason())
        );
        for (i, text) in cell_lines(r, &v).iter().enumerate() {
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
                x + CELL_W / 2.0,
                y + 18.0 + 15.0 * i as f64,
                escape(text)
            );
        }
    }

    /// What each verdict's colour means, under the grid.
    fn legend(&self, out: &mut String) {
        let legend_y = TOP + CELL_H * self.links.len() as f64 + 24.0;
        for (i, (fill, word)) in [
            (
                "#c8e6c9",
                "works: every message once, in the time the link allows",
            ),
            ("#ffe0b2", "degraded: lost, repeated, late or held"),
            ("#ffcdd2", "broken: refused, or most messages never arrived"),
        ]
        .iter()
        .enumerate()
        {
            let y = legend_y + 16.0 * i as f64;
            let _ = writeln!(
                out,
                r#"<rect x="12" y="{}" width="12" height="12" fill="{fill}"/><text x="30" y="{}" font-size="11">{word}</text>"#,
                y - 10.0,
                y
            );
        }
    }
}

/// The text lines of a cell: the verdict and the reason, wrapped, when nothing was delivered;
/// else the verdict with p50 / p99, wire bytes and requests per delivery, and the reason cut
/// short.
fn cell_lines(r: &PhaseResult, v: &Verdict) -> Vec<String> {
    if r.deliveries == 0 {
        let reason = v.reason().trim_start_matches("client: ");
        let mut lines = vec![v.word().to_uppercase()];
        lines.extend(wrap(reason, 28, 3));
        lines
    } else {
        vec![
            format!(
                "{} · {:.0} / {:.0} ms",
                v.word(),
                r.latency_ms.p50,
                r.latency_ms.p99
            ),
            format!(
                "{} B/deliv",
                r.wire_bytes_per_delivery
                    .map_or("n/a".into(), |b| format!("{b:.0}"))
            ),
            format!("{:.3} req/deliv", r.requests_per_delivery),
            short(v.reason(), 26),
        ]
    }
}

/// `text` in lines of at most `width` characters (split at spaces), at most `lines` of them.
fn wrap(text: &str, width: usize, lines: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match out.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => out.push(word.to_owned()),
        }
    }
    if out.len() > lines {
        out.truncate(lines);
        if let Some(last) = out.last_mut() {
            *last = short(&format!("{last} …"), width);
        }
    }
    out
}

fn short(text: &str, most: usize) -> String {
    if text.chars().count() <= most {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(most - 1).collect();
        cut.push('…');
        cut
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes comparison.md and comparison.svg into `args.out`.
pub fn write(args: &BenchArgs, results: &[PhaseResult]) -> std::io::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("comparison.md"), markdown(args, results))?;
    std::fs::write(args.out.join("comparison.svg"), svg(args, results))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::accounting::Percentiles;

    fn cell(link: &str, transport: &str, p50: f64, lost: u64, wire: f64) -> PhaseResult {
        let mut r = PhaseResult::failed(transport, 20.0, 10, Some(link.into()), String::new());
        r.failure = None;
        r.published = 100;
        r.expected_deliveries = 1000;
        r.deliveries = 1000 - lost;
        r.lost = lost;
        r.drained = lost == 0;
        r.undelivered = 0;
        r.latency_ms = Percentiles {
            p50,
            p99: p50 * 2.0,
            ..Percentiles::default()
        };
        r.wire_bytes_per_delivery = Some(wire);
        r
    }

    fn args() -> BenchArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        Cli::parse_from(["bench", "--poll-interval", "1s"]).bench
    }

    #[test]
    fn verdicts_follow_what_the_link_explains() {
        let args = args();
        // 3g explains ~100 ms one way; a poll adds half its interval.
        assert_eq!(
            verdict(&cell("3g", "ws", 104.0, 0, 190.0), &args),
            Verdict::Works
        );
        assert_eq!(
            verdict(&cell("3g", "poll", 700.0, 0, 210.0), &args),
            Verdict::Works
        );
        let held = verdict(&cell("3g+buffering-proxy", "sse", 1200.0, 0, 230.0), &args);
        assert!(
            matches!(&held, Verdict::Degraded(why) if why.contains("held on the way")),
            "{held:?}"
        );
        let lossy = verdict(&cell("flaky", "sse", 7.0, 3, 230.0), &args);
        assert!(
            matches!(&lossy, Verdict::Degraded(why) if why.starts_with("3 lost")),
            "{lossy:?}"
        );
        let mostly_lost = verdict(&cell("lan", "sse", 2.0, 600, 230.0), &args);
        assert!(matches!(mostly_lost, Verdict::Broken(_)));
        let refused = PhaseResult::failed(
            "ws",
            20.0,
            10,
            Some("lan+no-websocket".into()),
            "answered 403".into(),
        );
        assert_eq!(
            verdict(&refused, &args),
            Verdict::Broken("answered 403".into())
        );
    }

    #[test]
    fn the_reading_names_ties_within_five_percent_and_what_did_not_work() {
        let args = args();
        let results = [
            cell("3g", "ws", 102.1, 0, 194.0),
            cell("3g", "stream", 102.0, 0, 194.5),
            cell("3g", "longpoll", 210.0, 0, 291.0),
            PhaseResult::failed("sse", 20.0, 10, Some("3g".into()), "answered 403".into()),
        ];
        let lines = reading(&args, &results);
        assert_eq!(
            lines,
            [
                "**3g**: fastest that works: stream and ws (p50 102.0 ms); fewest bytes: ws and stream (194 B per delivery); sse broken: answered 403."
            ]
        );
        let svg = svg(&args, &results);
        assert!(svg.contains(">3g<") && svg.contains(">longpoll<") && svg.contains(">BROKEN<"));
        let md = markdown(&args, &results);
        assert!(md.contains("| 3g | sse | **broken** | n/a |"), "{md}");
    }
}
