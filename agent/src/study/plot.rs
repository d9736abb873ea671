//! Plain line charts as PNG, drawn pixel by pixel with the `image` crate (learning curves of
//! `microfed experiment`).
//!
//! - [`Chart`]: panels side by side (a grid), each with axes, ticks, a title and one line per series;
//!   one legend for the whole chart, one colour per series (the Okabe–Ito palette, which stays
//!   distinguishable for colour-blind readers).
//! - Text is the public-domain 8×8 bitmap font of the `font8x8` crate, drawn at twice its size.
//!
//! Deliberately small: no anti-aliasing, no layout engine. The charts are for reading results, and a
//! test checks that every series' pixels land where its values say.

use std::path::Path;

use image::{Rgb, RgbImage};

/// Why a chart could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("chart has no panel or no point")]
    Empty,
    #[error("{path}: {source}")]
    Write {
        path: String,
        source: image::ImageError,
    },
}

/// One line: `(x, y)` points, drawn in order; non-finite points are skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One set of axes.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

/// Panels sharing axis labels and a legend (series `i` has the same colour in every panel).
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub panels: Vec<Panel>,
}

/// Okabe–Ito colours, black last.
pub const PALETTE: [[u8; 3]; 8] = [
    [0, 114, 178],
    [230, 159, 0],
    [0, 158, 115],
    [204, 121, 167],
    [213, 94, 0],
    [86, 180, 233],
    [240, 228, 66],
    [0, 0, 0],
];

const PANEL_W: u32 = 460;
const PANEL_H: u32 = 330;
const LEFT: u32 = 70;
const RIGHT: u32 = 16;
const TOP: u32 = 40;
const BOTTOM: u32 = 56;
const TEXT_SCALE: u32 = 2;
const GLYPH: u32 = 8 * TEXT_SCALE;
const COLUMNS: usize = 3;

fn black() -> Rgb<u8> {
    Rgb([0, 0, 0])
}

/// The text as the font can draw it: typographic marks the labels use become their ASCII spelling
/// ("→" → "->", "−" → "-", "…" → "..."); Latin-1 and Greek stay (the font has both).
fn drawable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '→' => out.push_str("->"),
            '←' => out.push_str("<-"),
            '−' | '–' | '‐' => out.push('-'),
            '—' => out.push_str("--"),
            '…' => out.push_str("..."),
            '≤' => out.push_str("<="),
            '≥' => out.push_str(">="),
            '≈' => out.push('~'),
            '‘' | '’' => out.push('\''),
            '“' | '”' => out.push('"'),
            _ => out.push(ch),
        }
    }
    out
}

/// The 8×8 glyph of one character: ASCII, Latin-1 (U+00A0–U+00FF, with × and ±) and Greek
/// (U+0390–U+03C9, with μ); '?' for anything else.
fn glyph(ch: char) -> [u8; 8] {
    let c = ch as usize;
    match c {
        0..=0x7F => font8x8::legacy::BASIC_LEGACY[c],
        0xA0..=0xFF => font8x8::legacy::LATIN_LEGACY[c - 0xA0],
        0x390..=0x3C9 => font8x8::legacy::GREEK_LEGACY[c - 0x390],
        _ => font8x8::legacy::BASIC_LEGACY['?' as usize],
    }
}

/// Draws `text` with its top-left corner at (`x`, `y`) (see [`drawable`] and [`glyph`]).
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: u32, colour: Rgb<u8>) {
    for (i, ch) in drawable(s).chars().enumerate() {
        let glyph = glyph(ch);
        let gx = x + (i as i64) * 8 * i64::from(scale);
        for (row, bits) in glyph.iter().enumerate() {
            for bit in 0..8 {
                if bits & (1 << bit) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(
                                img,
                                gx + i64::from(bit * scale + dx),
                                y + (row as i64) * i64::from(scale) + i64::from(dy),
                                colour,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn text_width(s: &str, scale: u32) -> i64 {
    (drawable(s).chars().count() as i64) * 8 * i64::from(scale)
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// A line `thick` pixels wide (Bresenham, stamped with a square).
fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), thick: i64, c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        for ox in 0..thick {
            for oy in 0..thick {
                put(img, x + ox - thick / 2, y + oy - thick / 2, c);
            }
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `want` intervals over `span`.
pub fn nice_step(span: f64, want: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / want;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn format_tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else {
        let digits = (-step.log10().floor()) as usize;
        format!("{v:.digits$}")
    }
}

/// Maps data to pixels inside one panel's plotting area.
#[derive(Debug, Clone, Copy)]
struct Frame {
    x0: i64,
    y0: i64,
    w: i64,
    h: i64,
    xmin: f64,
    xmax: f64,
    ymin: f64,
    ymax: f64,
}

impl Frame {
    fn px(&self, x: f64, y: f64) -> (i64, i64) {
        let fx = (x - self.xmin) / (self.xmax - self.xmin);
        let fy = (y - self.ymin) / (self.ymax - self.ymin);
        (
            self.x0 + (fx * self.w as f64).round() as i64,
            self.y0 + self.h - (fy * self.h as f64).round() as i64,
        )
    }
}

/// Data range of a panel, widened to whole ticks.
fn panel_frame(panel: &Panel, ox: i64, oy: i64) -> Option<(Frame, f64, f64)> {
    let pts = || {
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts() {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    if !xmin.is_finite() {
        return None;
    }
    if xmax <= xmin {
        xmax = xmin + 1.0;
    }
    if ymax - ymin < 1e-9 {
        ymin -= 0.5;
        ymax += 0.5;
    }
    let ys = nice_step(ymax - ymin, 5.0);
    let (ymin, ymax) = ((ymin / ys).floor() * ys, (ymax / ys).ceil() * ys);
    let xs = nice_step(xmax - xmin, 8.0).max(1.0);
    Some((
        Frame {
            x0: ox + i64::from(LEFT),
            y0: oy + i64::from(TOP),
            w: i64::from(PANEL_W - LEFT - RIGHT),
            h: i64::from(PANEL_H - TOP - BOTTOM),
            xmin,
            xmax,
            ymin,
            ymax,
        },
        xs,
        ys,
    ))
}

impl Chart {
    /// Renders the chart (panels in rows of three, the legend below them).
    pub fn render(&self) -> Result<RgbImage, PlotError> {
        if self.panels.is_empty() {
            return Err(PlotError::Empty);
        }
        let labels: Vec<&str> = self
            .panels
            .iter()
            .flat_map(|p| p.series.iter().map(|s| s.label.as_str()))
            .fold(Vec::new(), |mut v, l| {
                if !v.contains(&l) {
                    v.push(l);
                }
                v
            });
        let cols = self.panels.len().min(COLUMNS) as u32;
        let rows = self.panels.len().div_ceil(COLUMNS) as u32;
        let legend_h = (labels.len() as u32).div_ceil(2) * (GLYPH + 8) + 16;
        let title_h = GLYPH + 20;
        let width = cols * PANEL_W + 20;
        let height = title_h + rows * PANEL_H + legend_h;
        let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
        text(&mut img, 10, 8, &self.title, TEXT_SCALE, black());
        let mut drew = false;
        for (p, panel) in self.panels.iter().enumerate() {
            let ox = 10 + (p % COLUMNS) as i64 * i64::from(PANEL_W);
            let oy = i64::from(title_h) + (p / COLUMNS) as i64 * i64::from(PANEL_H);
            let Some((f, xs, ys)) = panel_frame(panel, ox, oy) else {
                continue;
            };
            drew = true;
            self.axes(&mut img, panel, &f, xs, ys);
            for s in &panel.series {
                let Some(colour) = labels.iter().position(|l| *l == s.label) else {
                    continue;
                };
                let c = Rgb(PALETTE[colour % PALETTE.len()]);
                let pts: Vec<(i64, i64)> = s
                    .points
                    .iter()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .map(|&(x, y)| f.px(x, y))
                    .collect();
                for w in pts.windows(2) {
                    line(&mut img, w[0], w[1], 2, c);
                }
                for &(x, y) in &pts {
                    line(&mut img, (x, y), (x, y), 5, c);
                }
            }
        }
        if !drew {
            return Err(PlotError::Empty);
        }
        // Legend: two columns of colour swatches and labels.
        let ly = i64::from(title_h + rows * PANEL_H) + 8;
        for (i, l) in labels.iter().enumerate() {
            let x = 20 + (i % 2) as i64 * i64::from(width / 2);
            let y = ly + (i / 2) as i64 * i64::from(GLYPH + 8);
            let c = Rgb(PALETTE[i % PALETTE.len()]);
            line(
                &mut img,
                (x, y + i64::from(GLYPH) / 2),
                (x + 30, y + i64::from(GLYPH) / 2),
                4,
                c,
            );
            text(&mut img, x + 40, y, l, TEXT_SCALE, black());
        }
        Ok(img)
    }

    fn axes(&self, img: &mut RgbImage, panel: &Panel, f: &Frame, xs: f64, ys: f64) {
        let grey = Rgb([225, 225, 225]);
        let (left, bottom) = (f.x0, f.y0 + f.h);
        // Grid and y ticks.
        let mut y = f.ymin;
        while y <= f.ymax + ys * 1e-6 {
            let (_, py) = f.px(f.xmin, y);
            line(img, (left, py), (left + f.w, py), 1, grey);
            line(img, (left - 5, py), (left, py), 1, black());
            let t = format_tick(y, ys);
            text(img, left - 8 - text_width(&t, 1), py - 4, &t, 1, black());
            y += ys;
        }
        let mut x = (f.xmin / xs).ceil() * xs;
        while x <= f.xmax + xs * 1e-6 {
            let (px, _) = f.px(x, f.ymin);
            line(img, (px, bottom), (px, bottom + 5), 1, black());
            let t = format_tick(x, xs);
            text(img, px - text_width(&t, 1) / 2, bottom + 9, &t, 1, black());
            x += xs;
        }
        line(img, (left, f.y0), (left, bottom), 1, black());
        line(img, (left, bottom), (left + f.w, bottom), 1, black());
        // Title above, axis labels below and at the top left.
        text(img, left, f.y0 - 34, &panel.title, TEXT_SCALE, black());
        text(img, left, f.y0 - 14, &self.y_label, 1, black());
        let xl = &self.x_label;
        text(
            img,
            left + f.w / 2 - text_width(xl, TEXT_SCALE) / 2,
            bottom + 24,
            xl,
            TEXT_SCALE,
            black(),
        );
    }

    /// Renders and writes a PNG.
    pub fn save(&self, path: &Path) -> Result<(), PlotError> {
        self.render()?
            .save_with_format(path, image::ImageFormat::Png)
            .map_err(|source| PlotError::Write {
                path: path.display().to_string(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps_are_one_two_five() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        // 0.3 / 5 = 0.06 rounds up to 0.1; 0.2 / 5 = 0.04 to 0.05.
        assert!((nice_step(0.3, 5.0) - 0.1).abs() < 1e-12);
        assert!((nice_step(0.2, 5.0) - 0.05).abs() < 1e-12);
        assert_eq!(nice_step(47.0, 5.0), 10.0);
        assert_eq!(nice_step(0.0, 5.0), 1.0);
        assert_eq!(format_tick(0.15, 0.05), "0.15");
        assert_eq!(format_tick(40.0, 10.0), "40");
    }

    #[test]
    fn series_pixels_land_where_the_values_say() {
        let chart = Chart {
            title: "t".into(),
            x_label: "round".into(),
            y_label: "IoU".into(),
            panels: vec![Panel {
                title: "p".into(),
                series: vec![
                    Series {
                        label: "a".into(),
                        points: vec![(0.0, 0.0), (10.0, 10.0)],
                    },
                    Series {
                        label: "b".into(),
                        points: vec![(0.0, 10.0), (10.0, 0.0)],
                    },
                ],
            }],
        };
        let img = chart.render().unwrap();
        let (f, _, _) = panel_frame(&chart.panels[0], 10, i64::from(GLYPH + 20)).unwrap();
        // Series a rises from bottom-left, b falls from top-left: check a quarter of the way along.
        let (ax, ay) = f.px(2.5, 2.5);
        let (bx, by) = f.px(2.5, 7.5);
        assert_eq!(img.get_pixel(ax as u32, ay as u32), &Rgb(PALETTE[0]));
        assert_eq!(img.get_pixel(bx as u32, by as u32), &Rgb(PALETTE[1]));
        // Nothing of series b where only a is.
        let (cx, cy) = f.px(7.5, 7.5);
        assert_eq!(img.get_pixel(cx as u32, cy as u32), &Rgb(PALETTE[0]));
    }

    #[test]
    fn run_names_draw_without_question_marks() {
        // Experiment run names use ×, →, − and μ; none of them may fall back to '?'.
        let name = "FedAvg, 8 steps × 120 rounds → AdamW 240 steps, −0.5, μ 0.1, ±1 …";
        let shown = drawable(name);
        assert_eq!(
            shown,
            "FedAvg, 8 steps × 120 rounds -> AdamW 240 steps, -0.5, μ 0.1, ±1 ..."
        );
        let unknown = glyph('?');
        for ch in shown.chars().filter(|&c| c != '?') {
            assert_ne!(glyph(ch), unknown, "{ch:?} has no glyph");
        }
        assert_eq!(glyph('×'), font8x8::legacy::LATIN_LEGACY[0xD7 - 0xA0]);
        assert_eq!(glyph('\u{2603}'), unknown);
        assert_eq!(text_width("a → b", 1), 6 * 8);
    }

    #[test]
    fn a_chart_without_points_is_an_error() {
        let chart = Chart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            panels: vec![Panel {
                title: "p".into(),
                series: vec![Series {
                    label: "a".into(),
                    points: vec![(f64::NAN, 1.0)],
                }],
            }],
        };
        assert!(matches!(chart.render(), Err(PlotError::Empty)));
    }
}
