//! Polycrystal geometry: grains, annealing twins, closed boundaries, pores.
//!
//! Steps, each a function below:
//! 1. [`place_seeds`]: disks with log-normal radii placed by random sequential addition; their centres
//!    and squared radii are the sites and weights of a Laguerre (power) tessellation, which gives a
//!    log-normal-like grain size distribution and realistic convex-ish cells.
//! 2. [`SeedGrid::nearest`]: power-distance lookup through a bucket grid (no pixel × grain loop), at a
//!    position displaced by smooth low-frequency noise so boundaries curve gently. The displacement has
//!    a gradient well below 1, so the map is a homeomorphism and cells stay connected.
//! 3. Annealing twins: straight parallel bands across some grains; every lamella (and every piece of the
//!    parent) is its own region.
//! 4. [`mark_boundaries`]: a pixel is a seed of the boundary if an 8-neighbour has a larger region id, so
//!    two 8-adjacent pixels of different regions can never both stay interior; the seed line is then
//!    dilated to the requested width.
//! 5. [`clean_interiors`]: interior slivers smaller than [`MIN_GRAIN_PX`] become boundary, and interiors
//!    that touch only at a corner are cut, so each region's interior is one component under 4- and
//!    8-connectivity alike and the grain count from the mask equals the count from the id map.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use super::noise::{NO_LABEL, ValueNoise, label_components};
use super::render::{Blob, Scene};

/// Interior components smaller than this are slivers; they become boundary.
pub(crate) const MIN_GRAIN_PX: usize = 6;

/// Twin lamellae per grain are capped so a region id fits `cell * 8 + lamella`.
const MAX_TWIN_EDGES: usize = 4;

/// Geometry parameters of a polycrystal.
#[derive(Debug, Clone)]
pub(crate) struct PolyParams {
    /// Approximate mean grain diameter in px.
    pub grain_size_px: f32,
    /// Standard deviation of ln(radius) of the seed disks.
    pub size_spread: f32,
    /// Probability that a grain large enough carries annealing twins.
    pub twin_probability: f32,
    /// Width of the labelled boundary in px (1..=5).
    pub boundary_width: u32,
    /// Mean number of pores and inclusions per 512×512 px.
    pub pores_per_512px: f32,
}

/// What the generator knows about the grains of one image.
#[derive(Debug, Clone)]
pub(crate) struct GrainStats {
    pub grains: u32,
    pub touching_edge: u32,
    pub mean_area_px: f64,
    pub twin_lamellae: u32,
    pub pores: u32,
}

pub(crate) struct PolyOutput {
    pub scene: Scene,
    /// Class per pixel: 0 interior, 1 boundary.
    pub mask: Vec<u8>,
    /// Interior region id per pixel ([`NO_LABEL`] on boundaries), numbered 0..grains. Read by the
    /// closed-boundary test; the library itself only needs its statistics.
    #[cfg_attr(not(test), allow(dead_code))]
    pub regions: Vec<u32>,
    pub stats: GrainStats,
}

struct Twin {
    nx: f32,
    ny: f32,
    /// Sorted signed distances from the seed along (nx, ny) where a lamella starts or ends.
    edges: Vec<f32>,
}

struct Seed {
    x: f32,
    y: f32,
    r: f32,
}

/// Bucket grid over the seeds for nearest-by-power-distance lookups.
struct SeedGrid {
    cell: f32,
    x0: f32,
    y0: f32,
    nx: i32,
    ny: i32,
    buckets: Vec<Vec<u32>>,
    seeds: Vec<(f32, f32, f32)>, // x, y, weight = r²
    max_weight: f32,
}

impl SeedGrid {
    fn new(seeds: &[Seed], x0: f32, y0: f32, x1: f32, y1: f32, cell: f32) -> Self {
        let nx = ((x1 - x0) / cell).ceil().max(1.0) as i32;
        let ny = ((y1 - y0) / cell).ceil().max(1.0) as i32;
        let mut buckets = vec![Vec::new(); (nx * ny) as usize];
        let mut max_weight = 0.0f32;
        let mut data = Vec::with_capacity(seeds.len());
        for (i, s) in seeds.iter().enumerate() {
            let bx = (((s.x - x0) / cell) as i32).clamp(0, nx - 1);
            let by = (((s.y - y0) / cell) as i32).clamp(0, ny - 1);
            buckets[(by * nx + bx) as usize].push(i as u32);
            max_weight = max_weight.max(s.r * s.r);
            data.push((s.x, s.y, s.r * s.r));
        }
        Self {
            cell,
            x0,
            y0,
            nx,
            ny,
            buckets,
            seeds: data,
            max_weight,
        }
    }

    /// Index of the seed minimising |p − s|² − w, searching rings of buckets outward until no farther
    /// ring can beat the best (a seed in ring k+1 is at least k·cell away, and its weight at most
    /// `max_weight`).
    fn nearest(&self, x: f32, y: f32) -> u32 {
        let bx = (((x - self.x0) / self.cell) as i32).clamp(0, self.nx - 1);
        let by = (((y - self.y0) / self.cell) as i32).clamp(0, self.ny - 1);
        let (mut best, mut best_i) = (f32::INFINITY, 0u32);
        let max_ring = self.nx.max(self.ny);
        for ring in 0..=max_ring {
            for gy in (by - ring)..=(by + ring) {
                if gy < 0 || gy >= self.ny {
                    continue;
                }
                let on_edge_row = gy == by - ring || gy == by + ring;
                let mut gx = bx - ring;
                while gx <= bx + ring {
                    if gx >= 0 && gx < self.nx {
                        for &i in &self.buckets[(gy * self.nx + gx) as usize] {
                            let (sx, sy, w) = self.seeds[i as usize];
                            let d = (x - sx) * (x - sx) + (y - sy) * (y - sy) - w;
                            if d < best || (d == best && i < best_i) {
                                best = d;
                                best_i = i;
                            }
                        }
                    }
                    // Inner rows of the ring only have their two end buckets.
                    gx += if on_edge_row || ring == 0 {
                        1
                    } else {
                        2 * ring
                    };
                }
            }
            let reach = ring as f32 * self.cell;
            if best.is_finite() && reach * reach - self.max_weight > best {
                break;
            }
        }
        best_i
    }
}

/// Random sequential addition of disks with log-normal radii over the rectangle (x0,y0)–(x1,y1).
fn place_seeds(
    rng: &mut ChaCha8Rng,
    p: &PolyParams,
    x0: f32,
    y0: f32,
    x1: f32,
    y1: f32,
) -> Vec<Seed> {
    let area = (x1 - x0) * (y1 - y0);
    // Disks cover about half the plane; the Laguerre cells then have about twice a disk's area, so a
    // median disk radius of 0.36·D gives cells of equivalent diameter ≈ D.
    let median_r = 0.36 * p.grain_size_px;
    let mut radii = Vec::new();
    let mut covered = 0.0;
    while covered < 0.5 * area {
        let r = (median_r * (p.size_spread * rng.sample::<f32, _>(StandardNormal)).exp())
            .clamp(1.5, 4.0 * median_r);
        covered += std::f32::consts::PI * r * r;
        radii.push(r);
    }
    // Largest first, so big grains find room.
    radii.sort_by(|a, b| b.total_cmp(a));
    let r_max = radii.first().copied().unwrap_or(median_r);
    let cell = median_r.max(2.0);
    let gnx = ((x1 - x0) / cell).ceil() as i32 + 1;
    let gny = ((y1 - y0) / cell).ceil() as i32 + 1;
    let mut grid: Vec<Vec<u32>> = vec![Vec::new(); (gnx * gny) as usize];
    let mut seeds: Vec<Seed> = Vec::with_capacity(radii.len());
    for r in radii {
        let reach = ((r + r_max) / cell).ceil() as i32;
        for _ in 0..30 {
            let x = rng.random_range(x0..x1);
            let y = rng.random_range(y0..y1);
            let bx = ((x - x0) / cell) as i32;
            let by = ((y - y0) / cell) as i32;
            let mut ok = true;
            'search: for gy in (by - reach).max(0)..=(by + reach).min(gny - 1) {
                for gx in (bx - reach).max(0)..=(bx + reach).min(gnx - 1) {
                    for &j in &grid[(gy * gnx + gx) as usize] {
                        let s = &seeds[j as usize];
                        let min_d = 0.85 * (r + s.r);
                        if (x - s.x).powi(2) + (y - s.y).powi(2) < min_d * min_d {
                            ok = false;
                            break 'search;
                        }
                    }
                }
            }
            if ok {
                grid[(by * gnx + bx) as usize].push(seeds.len() as u32);
                seeds.push(Seed { x, y, r });
                break;
            }
        }
    }
    if seeds.is_empty() {
        seeds.push(Seed {
            x: 0.5 * (x0 + x1),
            y: 0.5 * (y0 + y1),
            r: median_r,
        });
    }
    seeds
}

/// Offsets of a disk-shaped structuring element of diameter `width` px (a 1-px line dilated by it is
/// `width` px wide). Even widths are centred half a pixel off, so the element has `width` rows.
fn disk_offsets(width: u32) -> Vec<(isize, isize)> {
    let w = width.max(1) as isize;
    let lo = -(w - 1) / 2;
    let hi = lo + w - 1;
    let c = (lo + hi) as f32 / 2.0;
    let r2 = (width as f32 / 2.0).powi(2) + 0.01;
    let mut out = Vec::new();
    for dy in lo..=hi {
        for dx in lo..=hi {
            if (dx as f32 - c).powi(2) + (dy as f32 - c).powi(2) <= r2 {
                out.push((dx, dy));
            }
        }
    }
    out
}

/// Boundary pixels of a region-id map: seeds where an 8-neighbour has a larger id, dilated to `width`.
pub(crate) fn mark_boundaries(ids: &[u32], w: usize, h: usize, width: u32) -> Vec<bool> {
    let mut seed_line = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            let id = ids[y * w + x];
            'n: for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    let (nx, ny) = (x as isize + dx, y as isize + dy);
                    if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                        continue;
                    }
                    if ids[ny as usize * w + nx as usize] > id {
                        seed_line[y * w + x] = true;
                        break 'n;
                    }
                }
            }
        }
    }
    if width <= 1 {
        return seed_line;
    }
    let offsets = disk_offsets(width);
    let mut out = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            if !seed_line[y * w + x] {
                continue;
            }
            for &(dx, dy) in &offsets {
                let (nx, ny) = (x as isize + dx, y as isize + dy);
                if nx >= 0 && ny >= 0 && nx < w as isize && ny < h as isize {
                    out[ny as usize * w + nx as usize] = true;
                }
            }
        }
    }
    out
}

/// Makes every region's interior one component under both 4- and 8-connectivity, and removes slivers.
/// Returns the interior component label per pixel and the number of components.
pub(crate) fn clean_interiors(
    ids: &[u32],
    boundary: &mut [bool],
    w: usize,
    h: usize,
) -> (Vec<u32>, u32) {
    for _ in 0..32 {
        let (labels, n) = label_components(ids, w, h, |p| !boundary[p], false);
        let mut sizes = vec![0usize; n as usize];
        for &l in &labels {
            if l != NO_LABEL {
                sizes[l as usize] += 1;
            }
        }
        let mut changed = false;
        for (p, &l) in labels.iter().enumerate() {
            if l != NO_LABEL && sizes[l as usize] < MIN_GRAIN_PX {
                boundary[p] = true;
                changed = true;
            }
        }
        // Corner-only contacts between two interior components (of the same region: different regions
        // are never 8-adjacent): cut the smaller side.
        for y in 0..h.saturating_sub(1) {
            for x in 0..w.saturating_sub(1) {
                let (a, b, c, d) = (
                    y * w + x,
                    y * w + x + 1,
                    (y + 1) * w + x,
                    (y + 1) * w + x + 1,
                );
                for (p, q, r, s) in [(a, d, b, c), (b, c, a, d)] {
                    let (lp, lq) = (labels[p], labels[q]);
                    if lp != NO_LABEL
                        && lq != NO_LABEL
                        && lp != lq
                        && !boundary[p]
                        && !boundary[q]
                        && boundary[r]
                        && boundary[s]
                    {
                        let cut = if sizes[lp as usize] <= sizes[lq as usize] {
                            p
                        } else {
                            q
                        };
                        boundary[cut] = true;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            return (labels, n);
        }
    }
    label_components(ids, w, h, |p| !boundary[p], false)
}

pub(crate) fn generate(w: usize, h: usize, p: &PolyParams, rng: &mut ChaCha8Rng) -> PolyOutput {
    let d = p.grain_size_px;
    let margin = 1.5 * d;
    let (x0, y0, x1, y1) = (-margin, -margin, w as f32 + margin, h as f32 + margin);
    let seeds = place_seeds(rng, p, x0, y0, x1, y1);
    let grid = SeedGrid::new(&seeds, x0, y0, x1, y1, (0.7 * d).max(4.0));

    // Tones (orientation contrast) per grain and per twin, and twin bands.
    let mut twins: Vec<Option<Twin>> = Vec::with_capacity(seeds.len());
    let mut tone_parent = Vec::with_capacity(seeds.len());
    let mut tone_twin = Vec::with_capacity(seeds.len());
    for s in &seeds {
        tone_parent.push(rng.random_range(-1.0f32..1.0));
        tone_twin.push(rng.random_range(-1.0f32..1.0));
        let r_cell = s.r / 0.72;
        let twinned = r_cell > 0.45 * d && rng.random::<f32>() < p.twin_probability;
        if !twinned {
            twins.push(None);
            continue;
        }
        let theta = rng.random_range(0.0..std::f32::consts::PI);
        let bands = if rng.random::<f32>() < 0.8 { 1 } else { 2 };
        let mut edges = Vec::with_capacity(2 * bands);
        for _ in 0..bands {
            let centre = rng.random_range(-0.5..0.5) * r_cell;
            let min_t = 2.0 * p.boundary_width as f32 + 6.0;
            let half = 0.5 * (rng.random_range(0.22..0.6) * r_cell).max(min_t);
            edges.push(centre - half);
            edges.push(centre + half);
        }
        edges.sort_by(f32::total_cmp);
        edges.truncate(MAX_TWIN_EDGES);
        twins.push(Some(Twin {
            nx: theta.cos(),
            ny: theta.sin(),
            edges,
        }));
    }

    // Region id per pixel: cell (through the warped position) × lamella (through the true position,
    // so twin boundaries are straight).
    let warp_x = ValueNoise::new(rng.random());
    let warp_y = ValueNoise::new(rng.random());
    let (amp, scale) = (0.2 * d, 1.0 / (1.1 * d));
    // Rows in parallel: every value is a pure function of the pixel position.
    let mut raw = vec![0u32; w * h];
    raw.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
        for (x, out) in row.iter_mut().enumerate() {
            let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
            let qx = fx + amp * warp_x.fbm(fx * scale, fy * scale, 2);
            let qy = fy + amp * warp_y.fbm(fx * scale, fy * scale, 2);
            let cell = grid.nearest(qx, qy);
            let lamella = match &twins[cell as usize] {
                None => 0,
                Some(t) => {
                    let s = &seeds[cell as usize];
                    let dist = t.nx * (fx - s.x) + t.ny * (fy - s.y);
                    t.edges.iter().filter(|&&e| e < dist).count() as u32
                }
            };
            *out = cell * 8 + lamella;
        }
    });

    // Connected pieces of the raw map (a twin band cuts its parent in two; discretisation can leave a
    // stray pixel) are separate regions.
    let (regions, _) = label_components(&raw, w, h, |_| true, false);
    let mut boundary = mark_boundaries(&regions, w, h, p.boundary_width);
    let (interior, grains) = clean_interiors(&regions, &mut boundary, w, h);

    let mut area = vec![0u64; grains as usize];
    let mut at_edge = vec![false; grains as usize];
    for y in 0..h {
        for x in 0..w {
            let l = interior[y * w + x];
            if l != NO_LABEL {
                area[l as usize] += 1;
                if x == 0 || y == 0 || x == w - 1 || y == h - 1 {
                    at_edge[l as usize] = true;
                }
            }
        }
    }
    let interior_px: u64 = area.iter().sum();
    let mut twin_regions = std::collections::BTreeSet::new();
    for (p, &l) in interior.iter().enumerate() {
        if l != NO_LABEL && raw[p] % 2 == 1 {
            twin_regions.insert(l);
        }
    }

    // Pores and inclusions: small dark blobs, inside grains or on boundaries; the mask keeps the class
    // of the grain structure under them.
    let mean = p.pores_per_512px * (w * h) as f32 / (512.0 * 512.0);
    let count = mean.floor() as usize + usize::from(rng.random::<f32>() < mean.fract());
    let blobs: Vec<Blob> = (0..count)
        .map(|_| Blob {
            x: rng.random_range(0.0..w as f32),
            y: rng.random_range(0.0..h as f32),
            r: rng.random_range(1.0f32..3.2) * (d / 40.0).clamp(0.6, 2.5),
            depth: rng.random_range(0.6..1.0),
        })
        .collect();

    let orient: Vec<f32> = raw
        .iter()
        .map(|&id| {
            let cell = (id / 8) as usize;
            if id % 2 == 1 {
                tone_twin[cell]
            } else {
                tone_parent[cell]
            }
        })
        .collect();
    let mask: Vec<u8> = boundary.iter().map(|&b| u8::from(b)).collect();
    let scene = Scene {
        width: w,
        height: h,
        phase: vec![0.0; w * h],
        orient,
        edge: boundary
            .iter()
            .map(|&b| if b { 1.0 } else { 0.0 })
            .collect(),
        blobs,
    };
    PolyOutput {
        scene,
        mask,
        regions: interior,
        stats: GrainStats {
            grains,
            touching_edge: at_edge.iter().filter(|&&e| e).count() as u32,
            mean_area_px: if grains > 0 {
                interior_px as f64 / grains as f64
            } else {
                0.0
            },
            twin_lamellae: twin_regions.len() as u32,
            pores: count as u32,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_offsets_have_the_requested_width() {
        for w in 1..=5u32 {
            let o = disk_offsets(w);
            let rows: std::collections::BTreeSet<_> = o.iter().map(|&(_, dy)| dy).collect();
            let cols: std::collections::BTreeSet<_> = o.iter().map(|&(dx, _)| dx).collect();
            assert_eq!(rows.len() as u32, w);
            assert_eq!(cols.len() as u32, w);
        }
    }

    #[test]
    fn straight_boundary_has_exact_width() {
        // Two half-planes meeting at x = 10: the boundary is `width` columns wide.
        let (w, h) = (20usize, 8usize);
        let ids: Vec<u32> = (0..w * h).map(|p| u32::from(p % w >= 10)).collect();
        for width in 1..=5 {
            let b = mark_boundaries(&ids, w, h, width);
            for y in 2..h - 2 {
                let n = (0..w).filter(|&x| b[y * w + x]).count() as u32;
                assert_eq!(n, width, "row {y} width {width}");
            }
        }
    }

    #[test]
    fn corner_contacts_are_cut() {
        // One region whose interior touches itself only diagonally.
        let (w, h) = (8usize, 8usize);
        let ids = vec![0u32; w * h];
        let mut boundary = vec![true; w * h];
        for y in 0..4 {
            for x in 0..4 {
                boundary[y * w + x] = false;
                boundary[(y + 4) * w + x + 4] = false;
            }
        }
        let (_, n) = clean_interiors(&ids, &mut boundary, w, h);
        let (_, n8) = label_components(&ids, w, h, |p| !boundary[p], true);
        assert_eq!(n, n8);
        assert_eq!(n, 2);
    }
}
