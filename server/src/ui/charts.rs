//! The instance page's CPU and memory charts: inline SVG drawn from the server's short
//! history of each replica ([`crate::agent_rpc::history`]), readable without colour (axis
//! labels, the current value in words) and with a text alternative (a table of samples).

use std::fmt::Write as _;
use std::time::Instant;

use crate::agent_rpc::history::{ReplicaHistory, SPAN, Sample};

/// The drawing's size in SVG units (it scales to the page's width).
const WIDTH: f64 = 480.0;
const HEIGHT: f64 = 150.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 24.0;
/// Rows of the text alternative's table.
const TABLE_ROWS: usize = 12;

/// One chart: its SVG and its text alternative.
#[derive(Clone, Debug)]
pub struct Chart {
    pub id: String,
    pub title: String,
    /// The current value, the highest and lowest of the hour, in words.
    pub summary: String,
    /// The `<svg>` element; every text in it is escaped.
    pub svg: String,
    /// (how long ago, value) of samples spread over the hour, newest first.
    pub rows: Vec<(String, String)>,
}

/// The charts of one replica.
#[derive(Clone, Debug)]
pub struct ReplicaCharts {
    pub replica: String,
    pub host: String,
    pub cpu: Chart,
    pub memory: Chart,
}

impl ReplicaCharts {
    /// The CPU chart, then the memory chart.
    pub fn both(&self) -> [&Chart; 2] {
        [&self.cpu, &self.memory]
    }
}

/// Escapes text for SVG/HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The smallest of 1, 2 or 5 times a power of ten that is at least `v` (and at least `floor`).
pub fn nice_ceiling(v: f64, floor: f64) -> f64 {
    let v = if v.is_finite() { v.max(floor) } else { floor };
    let mut step = 10f64.powf(v.log10().floor());
    loop {
        for m in [1.0, 2.0, 5.0, 10.0] {
            if step * m >= v - v * 1e-9 {
                return step * m;
            }
        }
        step *= 10.0;
    }
}

/// `12.5 %` of one CPU.
pub fn show_cpu(v: f64) -> String {
    format!("{v:.1} % CPU")
}

/// `512.0 MiB`, `1.50 GiB`.
pub fn show_memory(v: f64) -> String {
    const MI: f64 = (1u64 << 20) as f64;
    const GI: f64 = (1u64 << 30) as f64;
    if v >= GI {
        format!("{:.2} GiB", v / GI)
    } else {
        format!("{:.1} MiB", v / MI)
    }
}

/// `now`, `4 min ago`, `1 h ago`.
fn ago(secs: f64) -> String {
    let m = (secs / 60.0).round() as u64;
    match m {
        0 => "now".into(),
        60.. => "60 min ago".into(),
        m => format!("{m} min ago"),
    }
}

/// Draws `points` ((seconds ago, value), oldest first) over the last hour, from 0 to `y_max`.
pub fn svg(
    id: &str,
    title: &str,
    summary: &str,
    points: &[(f64, f64)],
    y_max: f64,
    show: fn(f64) -> String,
) -> String {
    let span = SPAN.as_secs_f64();
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |ago: f64| LEFT + plot_w * (1.0 - (ago / span).clamp(0.0, 1.0));
    let y = |v: f64| TOP + plot_h * (1.0 - (v / y_max).clamp(0.0, 1.0));
    let mut s = String::with_capacity(1024 + points.len() * 16);
    let (id, title, summary) = (esc(id), esc(title), esc(summary));
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="{id}-t {id}-d" xmlns="http://www.w3.org/2000/svg"><title id="{id}-t">{title}</title><desc id="{id}-d">{summary}</desc>"#
    );
    // The value axis: 0, half and the top, each with its label.
    for v in [0.0, y_max / 2.0, y_max] {
        let yy = y(v);
        let _ = write!(
            s,
            r#"<line class="grid" x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}"/><text class="axis" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            WIDTH - RIGHT,
            LEFT - 4.0,
            yy + 4.0,
            esc(&show(v))
        );
    }
    // The time axis: an hour ago, half an hour ago, now.
    for (ago_s, label, anchor) in [
        (span, "60 min ago", "start"),
        (span / 2.0, "30 min ago", "middle"),
        (0.0, "now", "end"),
    ] {
        let _ = write!(
            s,
            r#"<text class="axis" x="{:.1}" y="{:.1}" text-anchor="{anchor}">{label}</text>"#,
            x(ago_s),
            HEIGHT - 6.0
        );
    }
    if !points.is_empty() {
        s.push_str(r#"<polyline class="line" points=""#);
        for (i, (a, v)) in points.iter().enumerate() {
            if i > 0 {
                s.push(' ');
            }
            let _ = write!(s, "{:.1},{:.1}", x(*a), y(*v));
        }
        s.push_str(r#""/>"#);
        let (a, v) = points[points.len() - 1];
        let _ = write!(
            s,
            r#"<circle class="dot" cx="{:.1}" cy="{:.1}" r="3"/>"#,
            x(a),
            y(v)
        );
    }
    s.push_str("</svg>");
    s
}

/// What a chart plots of a sample, how it writes a value, and the least top of its axis.
struct Measure {
    value: fn(&Sample) -> f64,
    show: fn(f64) -> String,
    floor: f64,
}

fn chart(
    id: String,
    title: String,
    samples: &[Sample],
    now: Instant,
    m: Measure,
    extra: Option<String>,
) -> Chart {
    let Measure { value, show, floor } = m;
    let points: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (now.saturating_duration_since(s.at).as_secs_f64(), value(s)))
        .collect();
    let values = points.iter().map(|p| p.1);
    let high = values.clone().fold(0.0, f64::max);
    let low = values.fold(f64::INFINITY, f64::min);
    let summary = match points.last() {
        None => "No figures reported in the last hour.".to_string(),
        Some((a, v)) => {
            let mut t = format!(
                "{} ({}); highest {}, lowest {} over {} samples in the last hour",
                show(*v),
                ago(*a),
                show(high),
                show(low),
                points.len()
            );
            if let Some(e) = extra {
                t.push_str("; ");
                t.push_str(&e);
            }
            t.push('.');
            t
        }
    };
    let step = points.len().div_ceil(TABLE_ROWS).max(1);
    let rows = points
        .iter()
        .rev()
        .step_by(step)
        .map(|(a, v)| (ago(*a), show(*v)))
        .collect();
    let y_max = nice_ceiling(high, floor);
    Chart {
        svg: svg(&id, &title, &summary, &points, y_max, show),
        id,
        title,
        summary,
        rows,
    }
}

/// The CPU and memory charts of one replica's history.
pub fn replica_charts(h: &ReplicaHistory, now: Instant) -> ReplicaCharts {
    let limit = h
        .samples
        .last()
        .map(|s| s.memory_limit_bytes)
        .filter(|l| *l > 0)
        .map(|l| format!("limit {}", show_memory(l as f64)));
    ReplicaCharts {
        cpu: chart(
            format!("cpu-{}", h.replica),
            format!("CPU of {}, last hour", h.replica),
            &h.samples,
            now,
            Measure {
                value: |s| s.cpu_percent,
                show: show_cpu,
                floor: 10.0,
            },
            None,
        ),
        memory: chart(
            format!("mem-{}", h.replica),
            format!("Memory of {}, last hour", h.replica),
            &h.samples,
            now,
            Measure {
                value: |s| s.memory_bytes as f64,
                show: show_memory,
                floor: (64u64 << 20) as f64,
            },
            limit,
        ),
        replica: h.replica.clone(),
        host: h.host.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::agent_rpc::history::SAMPLE_EVERY;

    fn history(now: Instant, cpu: &[f64]) -> ReplicaHistory {
        let n = cpu.len() as u32;
        ReplicaHistory {
            replica: "bot-0".into(),
            host: "h1".into(),
            samples: cpu
                .iter()
                .enumerate()
                .map(|(i, c)| Sample {
                    at: now - SAMPLE_EVERY * (n - 1 - i as u32),
                    cpu_percent: *c,
                    memory_bytes: 256 << 20,
                    memory_limit_bytes: 1 << 30,
                })
                .collect(),
        }
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0, 10.0), 10.0);
        assert_eq!(nice_ceiling(12.0, 10.0), 20.0);
        assert_eq!(nice_ceiling(20.0, 10.0), 20.0);
        assert_eq!(nice_ceiling(37.0, 10.0), 50.0);
        assert_eq!(nice_ceiling(120.0, 10.0), 200.0);
        assert_eq!(nice_ceiling(f64::NAN, 10.0), 10.0);
    }

    #[test]
    fn a_chart_says_its_values_in_words_and_draws_them_on_labelled_axes() {
        let now = Instant::now();
        let c = replica_charts(&history(now, &[5.0, 40.0, 12.5]), now);
        assert_eq!(c.cpu.title, "CPU of bot-0, last hour");
        assert_eq!(
            c.cpu.summary,
            "12.5 % CPU (now); highest 40.0 % CPU, lowest 5.0 % CPU over 3 samples in the last hour."
        );
        assert_eq!(
            c.memory.summary,
            "256.0 MiB (now); highest 256.0 MiB, lowest 256.0 MiB over 3 samples in the last hour; limit 1.00 GiB."
        );
        let svg = &c.cpu.svg;
        assert!(svg.starts_with("<svg class=\"chart\""));
        assert!(svg.contains(r#"role="img" aria-labelledby="cpu-bot-0-t cpu-bot-0-d""#));
        assert!(svg.contains("<title id=\"cpu-bot-0-t\">CPU of bot-0, last hour</title>"));
        // The axis goes to the nice ceiling above the highest value, with labels in text.
        for label in [
            "0.0 % CPU",
            "25.0 % CPU",
            "50.0 % CPU",
            "60 min ago",
            "30 min ago",
            ">now<",
        ] {
            assert!(svg.contains(label), "{label} missing from {svg}");
        }
        // Three points, the newest at the right edge, 40 % at 80 % of the plot's height.
        let line = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let pts: Vec<(f64, f64)> = line
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect();
        assert_eq!(pts.len(), 3);
        assert_eq!(pts[2].0, WIDTH - RIGHT);
        assert!(pts[0].0 < pts[1].0 && pts[1].0 < pts[2].0);
        let plot_h = HEIGHT - TOP - BOTTOM;
        assert!((pts[1].1 - (TOP + plot_h * 0.2)).abs() < 0.1);
        // The table: newest first.
        assert_eq!(c.cpu.rows[0], ("now".to_string(), "12.5 % CPU".to_string()));
        assert_eq!(
            c.cpu.rows[2],
            ("1 min ago".to_string(), "5.0 % CPU".to_string())
        );
    }

    #[test]
    fn a_full_hour_keeps_the_table_short_and_text_is_escaped() {
        let now = Instant::now();
        let cpu: Vec<f64> = (0..120).map(|i| i as f64).collect();
        let mut h = history(now, &cpu);
        h.replica = "a<b>".into();
        let c = replica_charts(&h, now);
        assert!(c.cpu.rows.len() <= TABLE_ROWS);
        assert!(!c.cpu.svg.contains("<b>"));
        assert!(c.cpu.svg.contains("a&lt;b&gt;"));
        let _ = Duration::ZERO;
    }

    #[test]
    fn no_samples_draws_empty_axes_and_says_so() {
        let now = Instant::now();
        let c = replica_charts(&history(now, &[]), now);
        assert_eq!(c.cpu.summary, "No figures reported in the last hour.");
        assert!(!c.cpu.svg.contains("polyline"));
        assert!(c.cpu.svg.contains("60 min ago"));
    }
}
