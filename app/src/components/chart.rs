//! Metric charts drawn as SVG by the app itself: the average as a line, the min-max spread as
//! a band where a point covers many samples, a break where the VM was silent, the peak marked.

use crate::format::Fixed;
use domain::view::{MetricHistory, MetricPoint};
use leptos::prelude::*;
use std::fmt::Write;

/// The drawing's own coordinates; the SVG scales to its box.
pub const WIDTH: f64 = 720.0;
pub const HEIGHT: f64 = 160.0;
/// The grid line's height, half way up, as the SVG attribute says it.
const MIDDLE: &str = "80";

/// Which figure a chart shows, as (min, average, max) of one point, in percent.
pub type Pick = fn(&MetricPoint) -> Option<(f64, f64, f64)>;

pub fn cpu(p: &MetricPoint) -> Option<(f64, f64, f64)> {
    Some((p.cpu_min, p.cpu_avg, p.cpu_max))
}

pub fn ram(p: &MetricPoint) -> Option<(f64, f64, f64)> {
    Some((p.ram_percent_min, p.ram_percent_avg, p.ram_percent_max))
}

pub fn disk(p: &MetricPoint) -> Option<(f64, f64, f64)> {
    Some((
        p.disk_percent_min?,
        p.disk_percent_avg?,
        p.disk_percent_max?,
    ))
}

/// The highest max of a chart: where and what.
#[derive(Clone, Debug, PartialEq)]
pub struct Peak {
    pub x: f64,
    pub y: f64,
    pub t_ms: i64,
    pub value: f64,
}

/// SVG path data for one chart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Geometry {
    /// The averages; one subpath per run of consecutive points.
    pub line: String,
    /// The min-max spread, one closed shape per run.
    pub band: String,
    /// Runs of consecutive points: more than one means the VM was silent in between.
    pub runs: usize,
    pub peak: Option<Peak>,
}

/// Places each point at the middle of the time it covers, breaking the line wherever a
/// point is missing (no report in that span), so silence is never drawn as a value.
pub fn geometry(history: &MetricHistory, pick: Pick) -> Geometry {
    let f = domain::status::approx_f64;
    let span = f((history.to_ms - history.from_ms).max(1));
    let point_ms = history.point_ms.max(1);
    let x_of = |index: i64| {
        let middle = (f(index) + 0.5) * f(point_ms);
        (middle / span * WIDTH).clamp(0.0, WIDTH)
    };
    let y_of = |percent: f64| HEIGHT - percent.clamp(0.0, 100.0) / 100.0 * HEIGHT;
    let mut runs: Vec<Vec<(f64, f64, f64, f64)>> = Vec::new();
    let mut last_index = None;
    let mut peak: Option<Peak> = None;
    for point in &history.points {
        let Some((min, avg, max)) = pick(point) else {
            last_index = None;
            continue;
        };
        let index = (point.t_ms - history.from_ms).div_euclid(point_ms);
        let x = x_of(index);
        if last_index != Some(index - 1) || runs.is_empty() {
            runs.push(Vec::new());
        }
        if let Some(run) = runs.last_mut() {
            run.push((x, y_of(min), y_of(avg), y_of(max)));
        }
        last_index = Some(index);
        if peak.as_ref().is_none_or(|p| max > p.value) {
            peak = Some(Peak {
                x,
                y: y_of(max),
                t_ms: point.t_ms,
                value: max,
            });
        }
    }
    let mut line = String::new();
    let mut band = String::new();
    for run in &runs {
        for (i, (x, _, avg, _)) in run.iter().enumerate() {
            let command = if i == 0 { 'M' } else { 'L' };
            let _ = write!(line, "{command}{},{} ", Fixed(*x, 1), Fixed(*avg, 1));
        }
        // A lone point still shows: a short tick instead of an invisible zero-length line.
        if let [(x, _, avg, _)] = run.as_slice() {
            let _ = write!(line, "L{},{} ", Fixed(x + 1.5, 1), Fixed(*avg, 1));
        }
        for (i, (x, _, _, max)) in run.iter().enumerate() {
            let command = if i == 0 { 'M' } else { 'L' };
            let _ = write!(band, "{command}{},{} ", Fixed(*x, 1), Fixed(*max, 1));
        }
        for (x, min, _, _) in run.iter().rev() {
            let _ = write!(band, "L{},{} ", Fixed(*x, 1), Fixed(*min, 1));
        }
        band.push_str("Z ");
    }
    Geometry {
        line: line.trim_end().to_owned(),
        band: band.trim_end().to_owned(),
        runs: runs.len(),
        peak,
    }
}

/// One metric's chart with its title and current peak.
#[component]
pub fn Chart(
    title: &'static str,
    /// `data-metric` of the chart, for styles and tests.
    metric: &'static str,
    #[prop(into)] history: Signal<Option<MetricHistory>>,
    pick: Pick,
) -> impl IntoView {
    let drawn = Memo::new(move |_| history.with(|h| h.as_ref().map(|h| geometry(h, pick))));
    let view_box = format!("0 0 {} {}", Fixed(WIDTH, 0), Fixed(HEIGHT, 0));
    view! {
        <figure class="chart" data-metric=metric>
            <figcaption>
                {title}
                {move || {
                    drawn
                        .with(|g| g.as_ref().and_then(|g| g.peak.clone()))
                        .map(|p| format!(" (peak {}%)", Fixed(p.value, 0)))
                }}
            </figcaption>
            <svg
                viewBox=view_box
                preserveAspectRatio="none"
                role="img"
                aria-label=format!("{title} over the chosen range, in percent")
            >
                <line class="grid" x1="0" x2=Fixed(WIDTH, 0).to_string() y1=MIDDLE y2=MIDDLE/>
                <path
                    class="band"
                    d=move || drawn.with(|g| g.as_ref().map(|g| g.band.clone()).unwrap_or_default())
                />
                <path
                    class="line"
                    d=move || drawn.with(|g| g.as_ref().map(|g| g.line.clone()).unwrap_or_default())
                    data-runs=move || drawn.with(|g| g.as_ref().map_or(0, |g| g.runs))
                />
                {move || {
                    drawn
                        .with(|g| g.as_ref().and_then(|g| g.peak.clone()))
                        .map(|p| {
                            view! {
                                <circle
                                    class="peak"
                                    cx=Fixed(p.x, 1).to_string()
                                    cy=Fixed(p.y, 1).to_string()
                                    r="3"
                                    data-t-ms=p.t_ms
                                >
                                    <title>{format!("peak {}%", Fixed(p.value, 1))}</title>
                                </circle>
                            }
                        })
                }}
            </svg>
        </figure>
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::string_slice)]
    use super::*;
    use domain::VmId;
    use domain::history::Tier;

    fn point(t_ms: i64, cpu: f64) -> MetricPoint {
        MetricPoint {
            t_ms,
            samples: 1,
            cpu_min: cpu,
            cpu_avg: cpu,
            cpu_max: cpu,
            ram_percent_min: 10.0,
            ram_percent_avg: 10.0,
            ram_percent_max: 10.0,
            disk_percent_min: None,
            disk_percent_avg: None,
            disk_percent_max: None,
            uptime_max: 1,
        }
    }

    fn history(points: Vec<MetricPoint>) -> MetricHistory {
        MetricHistory {
            vm_id: VmId(1),
            from_ms: 0,
            to_ms: 1000,
            tier: Tier::Raw,
            point_ms: 100,
            points,
        }
    }

    #[test]
    fn a_silence_breaks_the_line_and_the_peak_sits_where_it_was() {
        let h = history(vec![
            point(0, 10.0),
            point(100, 20.0),
            // 200..500 silent
            point(500, 90.0),
            point(600, 30.0),
        ]);
        let g = geometry(&h, cpu);
        assert_eq!(g.runs, 2);
        assert_eq!(g.line.matches('M').count(), 2, "{}", g.line);
        assert_eq!(g.band.matches('Z').count(), 2, "{}", g.band);
        let peak = g.peak.unwrap();
        assert_eq!(peak.t_ms, 500);
        // The middle of the sixth point of ten: 55 % of the width.
        assert!((peak.x - 0.55 * WIDTH).abs() < 0.01, "{peak:?}");
        assert!((peak.y - 0.1 * HEIGHT).abs() < 0.01, "{peak:?}");
        // No vertex inside the silence.
        let silent = (0.25 * WIDTH)..(0.5 * WIDTH);
        for vertex in g.line.split_whitespace() {
            let x: f64 = vertex[1..].split(',').next().unwrap().parse().unwrap();
            assert!(!silent.contains(&x), "{vertex} in the silence");
        }
    }

    #[test]
    fn missing_figures_draw_nothing_and_a_lone_point_still_shows() {
        let h = history(vec![point(300, 50.0)]);
        assert_eq!(geometry(&h, disk), Geometry::default());
        let g = geometry(&h, cpu);
        assert_eq!(g.runs, 1);
        assert_eq!(g.line.matches('L').count(), 1, "{}", g.line);
    }
}
