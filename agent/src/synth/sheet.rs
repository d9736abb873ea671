//! Contact sheet: every style (rows) × structure (image, mask overlay) in one picture, with labels drawn
//! in a built-in 5×7 pixel font (no font files needed).
//!
//! Each tile is generated at twice its size and reduced by 2×2 averaging, so features keep their
//! default physical size while the sheet stays small. The same seed gives the same specimen in every
//! row, so the rows differ only by the microscope.

use image::{Rgb, RgbImage};
use rayon::prelude::*;

use super::{Sample, Structure, Style, SynthParams, generate};

const MARGIN: u32 = 8;
const SCALE: u32 = 2; // font pixels per glyph pixel
const GLYPH_W: u32 = 6 * SCALE; // 5 px glyph + 1 px spacing
const GLYPH_H: u32 = 7 * SCALE;

/// Rows of a 5×7 glyph, bit 4 = leftmost column.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ' ' => [0; 7],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, color: [u8; 3]) {
    for (i, c) in text.chars().enumerate() {
        let rows = glyph(c);
        for (gy, row) in rows.iter().enumerate() {
            for gx in 0..5u32 {
                if row & (0x10 >> gx) == 0 {
                    continue;
                }
                for sy in 0..SCALE {
                    for sx in 0..SCALE {
                        let px = x + i as u32 * GLYPH_W + gx * SCALE + sx;
                        let py = y + gy as u32 * SCALE + sy;
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, Rgb(color));
                        }
                    }
                }
            }
        }
    }
}

/// (image, overlay) tiles of one sample, reduced 2×2 to `tile` px.
fn tiles(sample: &Sample, structure: Structure, tile: u32) -> (RgbImage, RgbImage) {
    let classes = structure.classes();
    let gray = sample.image_u8();
    let big = tile * 2;
    let mut image = RgbImage::new(tile, tile);
    let mut overlay = RgbImage::new(tile, tile);
    for y in 0..tile {
        for x in 0..tile {
            let (mut g, mut o) = (0.0f32, [0.0f32; 3]);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let q = ((2 * y + dy) * big + 2 * x + dx) as usize;
                let v = gray[q] as f32;
                g += v / 4.0;
                let k = sample.mask.data[q] as usize;
                // Class 0 is left as the image; other classes are tinted with their colour.
                let (c, alpha) = match (k, classes.get(k)) {
                    (1.., Some(def)) => (def.color, 0.6),
                    _ => ([0, 0, 0], 0.0),
                };
                for ch in 0..3 {
                    o[ch] += ((1.0 - alpha) * v + alpha * c[ch] as f32) / 4.0;
                }
            }
            let g = g.round() as u8;
            image.put_pixel(x, y, Rgb([g, g, g]));
            overlay.put_pixel(x, y, Rgb(o.map(|v| v.round() as u8)));
        }
    }
    (image, overlay)
}

/// Every style preset (rows) × structure (columns: image, mask overlay), labelled. `tile` is clamped to
/// 64..=1024 px.
pub fn contact_sheet(tile: u32, seed: u64) -> RgbImage {
    let tile = tile.clamp(64, 1024);
    let styles = Style::PRESETS;
    let label_w = MARGIN + styles.iter().map(|s| s.len() as u32).max().unwrap_or(8) * GLYPH_W;
    let header_h = MARGIN + GLYPH_H + MARGIN;
    let cols = 2 * Structure::ALL.len() as u32;
    let width = label_w + MARGIN + cols * (tile + MARGIN);
    let height = header_h + styles.len() as u32 * (tile + MARGIN);
    let mut sheet = RgbImage::from_pixel(width, height, Rgb([24, 24, 24]));

    let jobs: Vec<(usize, usize)> = (0..styles.len())
        .flat_map(|r| (0..Structure::ALL.len()).map(move |c| (r, c)))
        .collect();
    let rendered: Vec<(usize, usize, RgbImage, RgbImage)> = jobs
        .par_iter()
        .filter_map(|&(r, c)| {
            let style = Style::preset(styles[r]).ok()?;
            let structure = Structure::ALL[c];
            let params = SynthParams::new(structure, style, tile * 2, tile * 2, seed).ok()?;
            let sample = generate(&params, 0);
            let (a, b) = tiles(&sample, structure, tile);
            Some((r, c, a, b))
        })
        .collect();
    for (r, c, img, overlay) in rendered {
        let y = header_h + r as u32 * (tile + MARGIN);
        let x = label_w + MARGIN + 2 * c as u32 * (tile + MARGIN);
        image::imageops::replace(&mut sheet, &img, x as i64, y as i64);
        image::imageops::replace(&mut sheet, &overlay, (x + tile + MARGIN) as i64, y as i64);
    }
    let text = [230, 230, 230];
    for (r, name) in styles.iter().enumerate() {
        let y = header_h + r as u32 * (tile + MARGIN) + tile / 2 - GLYPH_H / 2;
        draw_text(&mut sheet, MARGIN, y, name, text);
    }
    for (c, structure) in Structure::ALL.iter().enumerate() {
        let x = label_w + MARGIN + 2 * c as u32 * (tile + MARGIN);
        draw_text(&mut sheet, x, MARGIN, structure.name(), text);
        draw_text(&mut sheet, x + tile + MARGIN, MARGIN, "mask", [255, 214, 0]);
    }
    sheet
}
