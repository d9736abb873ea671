//! γ/γ′ superalloy geometry: a γ matrix (class 0), large secondary γ′ particles (class 1) and small
//! round tertiary γ′ particles (class 2).
//!
//! - Secondary γ′ sit on a slightly rotated, jittered square lattice (the cube directions of the γ
//!   crystal). Each site holds a rounded cuboid ([`Lobe`]: a blend of a circle and a p = 4 superellipse,
//!   with a small angular wobble); neighbouring sites are merged at random into one irregular particle by
//!   a bridge lobe, as in aged superalloys where cuboids coalesce.
//! - Tertiary γ′ are small discs placed by rejection in the matrix channels, denser where a
//!   low-frequency field is high, so they cluster as in real micrographs.
//! - Every particle is an analytic shape. [`Particle::coverage`] gives the exact-to-1/16 area of a pixel
//!   covered by it (4×4 supersampling where the pixel straddles the outline); the phase fractions in
//!   the truth are sums of these coverages, and the mask takes the class covering at least half a pixel.
//!
//! Channels between unmerged neighbours are about 0.2 L wide on average (half sizes 0.33–0.41 L); with
//! jitter and wobble two particles can occasionally touch. Coverage is then capped at 1 per pixel and
//! the particle count treats the touching pair as one, as a mask-based count would.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::noise::ValueNoise;
use super::render::Scene;

/// Geometry parameters of a γ/γ′ structure.
#[derive(Debug, Clone)]
pub(crate) struct PrecipParams {
    /// Spacing of the secondary γ′ lattice in px (particle size plus one channel).
    pub spacing_px: f32,
    /// Probability that two neighbouring secondary particles are merged.
    pub merge_probability: f32,
    /// Target area fraction of tertiary γ′.
    pub tertiary_fraction: f32,
}

pub(crate) struct PrecipOutput {
    pub scene: Scene,
    pub mask: Vec<u8>,
    /// Area fractions of classes 0, 1, 2 from the shapes.
    pub phase_fractions: [f64; 3],
    /// Particles per class (index 0, the matrix, is 0), touching particles counted once.
    pub particle_counts: [u32; 3],
    /// Mean covered area per particle of each class in px (0 for the matrix).
    pub mean_particle_area_px: [f64; 3],
}

/// One rounded-cuboid lobe in its own frame: half sizes `a` (along u) and `b` (along v).
#[derive(Debug, Clone)]
struct Lobe {
    cx: f32,
    cy: f32,
    a: f32,
    b: f32,
    cos: f32,
    sin: f32,
    /// 0: ellipse, 1: p = 4 superellipse (rounded square).
    squareness: f32,
    /// (amplitude, phase) of the angular harmonics k = 2, 3, 4, 5 of the outline radius.
    wobble: [(f32, f32); 4],
}

impl Lobe {
    #[inline]
    fn contains(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let u = (dx * self.cos + dy * self.sin) / self.a;
        let v = (-dx * self.sin + dy * self.cos) / self.b;
        let c = u * u + v * v;
        if c > 2.0 {
            return false; // beyond any outline: f ≥ c/√2 > 1.41, while Σ|wobble| ≤ 0.14 keeps thresholds below 1.30
        }
        if c == 0.0 {
            return true;
        }
        let m = (u * u * u * u + v * v * v * v).sqrt();
        let f = (1.0 - self.squareness) * c + self.squareness * m;
        let rho = c.sqrt();
        let (c1, s1) = (u / rho, v / rho);
        // cos/sin of kθ by repeated rotation.
        let (mut ck, mut sk) = (c1, s1);
        let mut thr = 1.0;
        for &(amp, phase) in &self.wobble {
            let (nc, ns) = (ck * c1 - sk * s1, sk * c1 + ck * s1);
            ck = nc;
            sk = ns;
            thr += amp * (ck * phase.cos() - sk * phase.sin());
        }
        f <= thr * thr
    }

    fn extent(&self) -> f32 {
        let wob: f32 = self.wobble.iter().map(|w| w.0).sum();
        self.a.max(self.b) * 1.42 * (1.0 + wob)
    }
}

#[derive(Debug, Clone)]
struct Particle {
    class: u8,
    lobes: Vec<Lobe>,
    tone: f32,
    bbox: (i32, i32, i32, i32),
}

impl Particle {
    fn new(class: u8, lobes: Vec<Lobe>, tone: f32) -> Self {
        let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
        for l in &lobes {
            let e = l.extent();
            x0 = x0.min(l.cx - e);
            y0 = y0.min(l.cy - e);
            x1 = x1.max(l.cx + e);
            y1 = y1.max(l.cy + e);
        }
        Self {
            class,
            lobes,
            tone,
            bbox: (
                x0.floor() as i32,
                y0.floor() as i32,
                x1.ceil() as i32,
                y1.ceil() as i32,
            ),
        }
    }

    #[inline]
    fn contains(&self, x: f32, y: f32) -> bool {
        self.lobes.iter().any(|l| l.contains(x, y))
    }

    /// Fraction of pixel (px, py) covered: corners and centre decide clear cases, else 4×4 samples.
    fn coverage(&self, px: i32, py: i32) -> f32 {
        let (x, y) = (px as f32, py as f32);
        let probes = [
            self.contains(x + 0.5, y + 0.5),
            self.contains(x, y),
            self.contains(x + 1.0, y),
            self.contains(x, y + 1.0),
            self.contains(x + 1.0, y + 1.0),
        ];
        if probes.iter().all(|&b| b) {
            return 1.0;
        }
        if probes.iter().all(|&b| !b) {
            return 0.0;
        }
        let mut hits = 0u32;
        for sy in 0..4 {
            for sx in 0..4 {
                let (ox, oy) = ((sx as f32 + 0.5) / 4.0, (sy as f32 + 0.5) / 4.0);
                hits += u32::from(self.contains(x + ox, y + oy));
            }
        }
        hits as f32 / 16.0
    }
}

fn wobble(rng: &mut ChaCha8Rng, scale: f32) -> [(f32, f32); 4] {
    let tau = std::f32::consts::TAU;
    [
        (
            rng.random_range(0.0..0.05) * scale,
            rng.random_range(0.0..tau),
        ),
        (
            rng.random_range(0.0..0.04) * scale,
            rng.random_range(0.0..tau),
        ),
        (
            rng.random_range(0.0..0.03) * scale,
            rng.random_range(0.0..tau),
        ),
        (
            rng.random_range(0.0..0.02) * scale,
            rng.random_range(0.0..tau),
        ),
    ]
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

/// Secondary γ′ particles on a jittered lattice, merged in small groups.
fn secondary_particles(
    w: usize,
    h: usize,
    p: &PrecipParams,
    rng: &mut ChaCha8Rng,
) -> Vec<Particle> {
    let l = p.spacing_px;
    let phi: f32 = rng.random_range(-0.35..0.35);
    let (c, s) = (phi.cos(), phi.sin());
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let n = ((w.max(h) as f32 * 0.75) / l).ceil() as i32 + 2;
    let side = (2 * n + 1) as usize;
    // Sites: index (i + n) + (j + n)·side; None where the site is empty or off the image.
    let mut sites: Vec<Option<Lobe>> = vec![None; side * side];
    for j in -n..=n {
        for i in -n..=n {
            let u = i as f32 + rng.random_range(-0.06..0.06);
            let v = j as f32 + rng.random_range(-0.06..0.06);
            let x = cx + l * (u * c - v * s);
            let y = cy + l * (u * s + v * c);
            let a = l * rng.random_range(0.33..0.41);
            let b = (a * rng.random_range(0.88..1.12)).min(0.41 * l);
            let small = rng.random::<f32>() < 0.08;
            let keep = rng.random::<f32>() < 0.96;
            let rot = phi + rng.random_range(-0.05..0.05);
            let squareness = rng.random_range(0.3..0.8);
            let wob = wobble(rng, 1.0);
            let off = x < -l || y < -l || x > w as f32 + l || y > h as f32 + l;
            if !keep || off {
                continue;
            }
            let shrink = if small {
                rng.random_range(0.45..0.8)
            } else {
                1.0
            };
            sites[(i + n) as usize + (j + n) as usize * side] = Some(Lobe {
                cx: x,
                cy: y,
                a: a * shrink,
                b: b * shrink,
                cos: rot.cos(),
                sin: rot.sin(),
                squareness,
                wobble: wob,
            });
        }
    }
    // Merge neighbours into groups of at most 4 sites; each merge adds a bridge lobe.
    let mut parent: Vec<usize> = (0..sites.len()).collect();
    let mut size = vec![1usize; sites.len()];
    let mut bridges: Vec<(usize, Lobe)> = Vec::new();
    for jj in 0..side {
        for ii in 0..side {
            let a_idx = ii + jj * side;
            for (di, dj) in [(1usize, 0usize), (0, 1)] {
                let (ni, nj) = (ii + di, jj + dj);
                if ni >= side || nj >= side {
                    continue;
                }
                let b_idx = ni + nj * side;
                let (Some(la), Some(lb)) = (&sites[a_idx], &sites[b_idx]) else {
                    continue;
                };
                // Shrunken (young) particles do not coalesce: a bridge would outgrow them.
                let full = 0.32 * l;
                if rng.random::<f32>() >= p.merge_probability || la.a.min(lb.a) < full {
                    continue;
                }
                let (ra, rb) = (find(&mut parent, a_idx), find(&mut parent, b_idx));
                if ra == rb || size[ra] + size[rb] > 4 {
                    continue;
                }
                let (dx, dy) = (lb.cx - la.cx, lb.cy - la.cy);
                let len = (dx * dx + dy * dy).sqrt();
                let ang = dy.atan2(dx);
                let half_w = rng.random_range(0.6..0.9) * la.b.min(lb.b).min(la.a.min(lb.a));
                let bridge = Lobe {
                    cx: 0.5 * (la.cx + lb.cx),
                    cy: 0.5 * (la.cy + lb.cy),
                    a: 0.5 * len,
                    b: half_w,
                    cos: ang.cos(),
                    sin: ang.sin(),
                    squareness: 1.0,
                    wobble: wobble(rng, 0.5),
                };
                parent[rb] = ra;
                size[ra] += size[rb];
                bridges.push((ra, bridge));
            }
        }
    }
    let mut groups: std::collections::BTreeMap<usize, Vec<Lobe>> = Default::default();
    for (idx, site) in sites.iter().enumerate() {
        if let Some(lobe) = site {
            let root = find(&mut parent, idx);
            groups.entry(root).or_default().push(lobe.clone());
        }
    }
    for (root, bridge) in bridges {
        let root = find(&mut parent, root);
        groups.entry(root).or_default().push(bridge);
    }
    groups
        .into_values()
        .map(|lobes| Particle::new(1, lobes, rng.random_range(-1.0..1.0)))
        .collect()
}

pub(crate) fn generate(w: usize, h: usize, p: &PrecipParams, rng: &mut ChaCha8Rng) -> PrecipOutput {
    let n = w * h;
    let mut particles = secondary_particles(w, h, p, rng);

    // Rasterise class 1: coverage, and the particle owning each pixel.
    let mut cover = [vec![0.0f32; n], vec![0.0f32; n]]; // classes 1, 2
    let mut owner = vec![u32::MAX; n];
    let mut owner_cov = vec![0.0f32; n];
    let rasterise = |part: &Particle,
                     id: u32,
                     cover: &mut Vec<f32>,
                     owner: &mut [u32],
                     owner_cov: &mut [f32]| {
        let (x0, y0, x1, y1) = part.bbox;
        for py in y0.max(0)..=y1.min(h as i32 - 1) {
            for px in x0.max(0)..=x1.min(w as i32 - 1) {
                let cov = part.coverage(px, py);
                if cov > 0.0 {
                    let q = py as usize * w + px as usize;
                    cover[q] = (cover[q] + cov).min(1.0);
                    if cov > owner_cov[q] {
                        owner_cov[q] = cov;
                        owner[q] = id;
                    }
                }
            }
        }
    };
    for (id, part) in particles.iter().enumerate() {
        rasterise(part, id as u32, &mut cover[0], &mut owner, &mut owner_cov);
    }

    // Tertiary γ′ in the channels, clustered by a low-frequency field, at least `gap` px from any
    // secondary particle and from each other.
    let scale = (p.spacing_px / 100.0).clamp(0.6, 3.0);
    let gap = 2.0 * scale;
    let cluster = ValueNoise::new(rng.random());
    let target = p.tertiary_fraction as f64 * n as f64;
    let mut placed_area = 0.0f64;
    let cell = 8.0 * scale;
    let gnx = (w as f32 / cell).ceil() as usize + 1;
    let gny = (h as f32 / cell).ceil() as usize + 1;
    let mut grid: Vec<Vec<(f32, f32, f32)>> = vec![Vec::new(); gnx * gny];
    let max_tries = (target / 4.0) as usize * 20 + 200;
    let mut tries = 0;
    while placed_area < target && tries < max_tries {
        tries += 1;
        let x = rng.random_range(0.0..w as f32);
        let y = rng.random_range(0.0..h as f32);
        let r = rng.random_range(2.0f32..4.0) * scale;
        let density = cluster.fbm(x / (0.7 * p.spacing_px), y / (0.7 * p.spacing_px), 2);
        if rng.random::<f32>() > (0.15 + 1.6 * density).clamp(0.0, 1.0) {
            continue;
        }
        // Clear of secondary particles: no class-1 coverage within r + gap.
        let reach = r + gap;
        let mut clear = true;
        'win: for py in
            ((y - reach).floor() as i32).max(0)..=((y + reach).ceil() as i32).min(h as i32 - 1)
        {
            for px in
                ((x - reach).floor() as i32).max(0)..=((x + reach).ceil() as i32).min(w as i32 - 1)
            {
                let (ddx, ddy) = (px as f32 + 0.5 - x, py as f32 + 0.5 - y);
                if ddx * ddx + ddy * ddy <= (reach + 0.71).powi(2)
                    && cover[0][py as usize * w + px as usize] > 0.0
                {
                    clear = false;
                    break 'win;
                }
            }
        }
        if !clear {
            continue;
        }
        let (gx, gy) = ((x / cell) as usize, (y / cell) as usize);
        let reach_cells = ((2.0 * 4.0 * scale + gap) / cell).ceil() as usize;
        let mut free = true;
        'grid: for cy in gy.saturating_sub(reach_cells)..=(gy + reach_cells).min(gny - 1) {
            for cx in gx.saturating_sub(reach_cells)..=(gx + reach_cells).min(gnx - 1) {
                for &(ox, oy, or) in &grid[cy * gnx + cx] {
                    if (ox - x).powi(2) + (oy - y).powi(2) < (or + r + gap).powi(2) {
                        free = false;
                        break 'grid;
                    }
                }
            }
        }
        if !free {
            continue;
        }
        grid[gy * gnx + gx].push((x, y, r));
        placed_area += std::f64::consts::PI * (r as f64).powi(2);
        let lobe = Lobe {
            cx: x,
            cy: y,
            a: r,
            b: r * rng.random_range(0.9..1.1),
            cos: 1.0,
            sin: 0.0,
            squareness: 0.0,
            wobble: wobble(rng, 0.6),
        };
        particles.push(Particle::new(2, vec![lobe], rng.random_range(-1.0..1.0)));
    }
    let first_tertiary = particles
        .iter()
        .position(|q| q.class == 2)
        .unwrap_or(particles.len());
    for (id, part) in particles.iter().enumerate().skip(first_tertiary) {
        rasterise(part, id as u32, &mut cover[1], &mut owner, &mut owner_cov);
    }

    // Mask: the class covering at least half the pixel.
    let mut mask = vec![0u8; n];
    for q in 0..n {
        mask[q] = if cover[0][q] >= 0.5 {
            1
        } else if cover[1][q] >= 0.5 {
            2
        } else {
            0
        };
        if mask[q] == 0 {
            owner[q] = u32::MAX;
        }
    }

    // Particle counts: particles with at least one mask pixel; particles whose pixels touch (8-adjacent,
    // same class) count once.
    let np = particles.len();
    let mut parent: Vec<usize> = (0..np).collect();
    let mut present = vec![false; np];
    for y in 0..h {
        for x in 0..w {
            let q = y * w + x;
            let o = owner[q];
            if o == u32::MAX {
                continue;
            }
            present[o as usize] = true;
            for (dx, dy) in [(1isize, 0isize), (0, 1), (1, 1), (-1, 1)] {
                let (nx, ny) = (x as isize + dx, y as isize + dy);
                if nx < 0 || nx >= w as isize || ny >= h as isize {
                    continue;
                }
                let r = ny as usize * w + nx as usize;
                let o2 = owner[r];
                if o2 != u32::MAX && o2 != o && mask[r] == mask[q] {
                    let (a, b) = (
                        find(&mut parent, o as usize),
                        find(&mut parent, o2 as usize),
                    );
                    if a != b {
                        parent[b] = a;
                    }
                }
            }
        }
    }
    // Count groups by their present members (a group's root may itself have no pixel).
    let mut seen = std::collections::BTreeSet::new();
    let mut counts = [0u32; 3];
    for i in 0..np {
        if present[i] {
            let r = find(&mut parent, i);
            if seen.insert(r) {
                counts[particles[i].class as usize] += 1;
            }
        }
    }

    let sum1: f64 = cover[0].iter().map(|&v| v as f64).sum();
    let sum2: f64 = cover[1].iter().map(|&v| v as f64).sum();
    let f1 = sum1 / n as f64;
    let f2 = sum2 / n as f64;
    let mean_area = |sum: f64, k: u32| if k > 0 { sum / k as f64 } else { 0.0 };

    // Scene: anti-aliased phase levels (γ bright, γ′ darker, as in etched SEM images), a per-particle
    // tone, and the interface line.
    const LEVELS: [f32; 3] = [0.3, -0.3, -0.4];
    let mut phase = vec![0.0f32; n];
    let mut orient = vec![0.0f32; n];
    let mut edge = vec![0.0f32; n];
    for q in 0..n {
        let (c1, c2) = (cover[0][q], cover[1][q]);
        let c0 = (1.0 - c1 - c2).max(0.0);
        phase[q] = c0 * LEVELS[0] + c1 * LEVELS[1] + c2 * LEVELS[2];
        if owner[q] != u32::MAX {
            orient[q] = 0.3 * particles[owner[q] as usize].tone;
        }
        let (x, y) = (q % w, q / w);
        let k = mask[q];
        let differs = (x + 1 < w && mask[q + 1] != k)
            || (x > 0 && mask[q - 1] != k)
            || (y + 1 < h && mask[q + w] != k)
            || (y > 0 && mask[q - w] != k);
        if differs && k == 0 {
            // The bright rim of SEM images sits on the matrix side of the interface; tertiary particles
            // are too small to show much of it.
            let next_to_secondary = (x + 1 < w && mask[q + 1] == 1)
                || (x > 0 && mask[q - 1] == 1)
                || (y + 1 < h && mask[q + w] == 1)
                || (y > 0 && mask[q - w] == 1);
            edge[q] = if next_to_secondary { 1.0 } else { 0.3 };
        }
    }
    PrecipOutput {
        scene: Scene {
            width: w,
            height: h,
            phase,
            orient,
            edge,
            blobs: Vec::new(),
        },
        mask,
        phase_fractions: [1.0 - f1 - f2, f1, f2],
        particle_counts: counts,
        mean_particle_area_px: [0.0, mean_area(sum1, counts[1]), mean_area(sum2, counts[2])],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disc_coverage_matches_its_area() {
        let lobe = Lobe {
            cx: 20.3,
            cy: 19.7,
            a: 7.5,
            b: 7.5,
            cos: 1.0,
            sin: 0.0,
            squareness: 0.0,
            wobble: [(0.0, 0.0); 4],
        };
        let part = Particle::new(2, vec![lobe], 0.0);
        let mut area = 0.0;
        for y in 0..40 {
            for x in 0..40 {
                area += part.coverage(x, y) as f64;
            }
        }
        let exact = std::f64::consts::PI * 7.5 * 7.5;
        assert!((area - exact).abs() / exact < 0.01, "{area} vs {exact}");
    }

    #[test]
    fn square_lobe_is_squarer_than_a_circle() {
        let mk = |squareness| Lobe {
            cx: 0.0,
            cy: 0.0,
            a: 10.0,
            b: 10.0,
            cos: 1.0,
            sin: 0.0,
            squareness,
            wobble: [(0.0, 0.0); 4],
        };
        // The diagonal point at 0.8·a·(1,1) is outside the circle but inside the rounded square.
        assert!(!mk(0.0).contains(8.0, 8.0));
        assert!(mk(1.0).contains(8.0, 8.0));
        assert!(mk(0.5).contains(9.9, 0.0) && !mk(0.5).contains(10.1, 0.0));
    }
}
