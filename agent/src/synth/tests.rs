//! Tests of the public synth API: determinism, sizes, boundary width, closed boundaries, truth against
//! the mask, styles from files.

use super::noise::{NO_LABEL, label_components};
use super::*;

fn params(structure: Structure, style: &str, w: u32, h: u32, seed: u64) -> SynthParams {
    SynthParams::new(structure, Style::preset(style).unwrap(), w, h, seed).unwrap()
}

/// Connected components of the pixels of `class` in a mask.
fn mask_components(mask: &Mask, class: u8, eight: bool) -> u32 {
    let ids: Vec<u32> = mask.data.iter().map(|&c| u32::from(c)).collect();
    label_components(
        &ids,
        mask.width as usize,
        mask.height as usize,
        |p| mask.data[p] == class,
        eight,
    )
    .1
}

#[test]
fn same_seed_same_bytes_other_seed_other_image() {
    for s in Structure::ALL {
        let p = params(s, "sem-se", 160, 128, 11);
        let (a, b) = (generate(&p, 3), generate(&p, 3));
        assert_eq!(a.image, b.image);
        assert_eq!(a.mask, b.mask);
        assert_eq!(a.truth, b.truth);
        let c = generate(&p.clone().with_seed(12), 3);
        assert_ne!(a.image, c.image);
        assert_ne!(a.mask, c.mask);
        let d = generate(&p, 4);
        assert_ne!(a.mask, d.mask, "index selects a different specimen");
    }
}

#[test]
fn one_specimen_in_every_style() {
    // Geometry and rendering use separate generators: the styles see the same truth.
    let a = generate(&params(Structure::Polycrystal, "sem-se", 128, 128, 5), 0);
    let b = generate(&params(Structure::Polycrystal, "hazy", 128, 128, 5), 0);
    assert_eq!(a.mask, b.mask);
    assert_eq!(a.truth.grains, b.truth.grains);
    assert_ne!(a.image, b.image);
}

#[test]
fn sizes_small_and_non_square_and_out_of_range() {
    for s in Structure::ALL {
        for (w, h) in [(64, 64), (200, 96), (64, 300)] {
            let sample = generate(&params(s, "optical-etched", w, h, 1), 0);
            assert_eq!((sample.mask.width, sample.mask.height), (w, h));
            assert_eq!(sample.image.len(), (w * h) as usize);
            assert_eq!((sample.truth.width, sample.truth.height), (w, h));
        }
    }
    let style = Style::preset("sem-se").unwrap();
    for (w, h) in [(63, 100), (100, 4097), (0, 0)] {
        let err = SynthParams::new(Structure::Polycrystal, style.clone(), w, h, 0).unwrap_err();
        assert!(matches!(err, SynthError::Size { .. }), "{err}");
    }
    assert_eq!(parse_size("512").unwrap(), (512, 512));
    assert_eq!(parse_size("640x480").unwrap(), (640, 480));
    assert_eq!(parse_size("640×480").unwrap(), (640, 480));
    assert!(matches!(parse_size("64x"), Err(SynthError::SizeSyntax(_))));
    assert!(matches!(parse_size("32"), Err(SynthError::Size { .. })));
    let p = params(Structure::Polycrystal, "sem-se", 64, 64, 0);
    assert!(matches!(
        p.clone().with_boundary_width(0),
        Err(SynthError::BoundaryWidth(0))
    ));
    assert!(p.clone().with_boundary_width(6).is_err());
    assert!(p.with_feature_size(f32::NAN).is_err());
}

#[test]
fn boundary_width_is_honoured() {
    // The boundary area grows in proportion to the width on the same specimen.
    let base = params(Structure::Polycrystal, "sem-se", 256, 256, 9);
    let fraction = |w: u32| {
        let s = generate(&base.clone().with_boundary_width(w).unwrap(), 0);
        assert_eq!(s.truth.boundary_width, w);
        s.mask.histogram()[1] as f64 / s.mask.data.len() as f64
    };
    let f1 = fraction(1);
    assert!(f1 > 0.02 && f1 < 0.2, "1-px boundaries cover {f1}");
    for w in 2..=5u32 {
        let ratio = fraction(w) / f1;
        let w = w as f64;
        assert!(
            ratio > 0.75 * w && ratio < 1.2 * w,
            "width {w}: boundary area ×{ratio:.2} of the 1-px one"
        );
    }
}

#[test]
fn boundaries_are_closed_and_grain_counts_match_the_mask() {
    for (seed, bw) in [(1u64, 1u32), (2, 2), (3, 3), (4, 5), (5, 1), (6, 4)] {
        let p = params(Structure::Polycrystal, "sem-se", 192, 160, seed)
            .with_boundary_width(bw)
            .unwrap();
        let mut rng = rng_for(seed, TAG_GEOMETRY, 0);
        let poly = polycrystal::PolyParams {
            grain_size_px: p.feature_size_px(),
            size_spread: 0.35,
            twin_probability: 0.22,
            boundary_width: bw,
            pores_per_512px: 6.0,
        };
        let out = polycrystal::generate(192, 160, &poly, &mut rng);
        let (w, h) = (192usize, 160usize);
        // No two interior pixels of different regions are 8-adjacent.
        for y in 0..h {
            for x in 0..w {
                let a = out.regions[y * w + x];
                if a == NO_LABEL {
                    assert_eq!(out.mask[y * w + x], 1);
                    continue;
                }
                assert_eq!(out.mask[y * w + x], 0);
                for (dx, dy) in [(1isize, 0isize), (0, 1), (1, 1), (-1, 1)] {
                    let (nx, ny) = (x as isize + dx, y as isize + dy);
                    if nx < 0 || nx >= w as isize || ny >= h as isize {
                        continue;
                    }
                    let b = out.regions[ny as usize * w + nx as usize];
                    assert!(
                        b == NO_LABEL || b == a,
                        "seed {seed} bw {bw}: regions {a} and {b} touch at ({x},{y})"
                    );
                }
            }
        }
        // The public sample carries the same truth, and connected components of the mask (4 or 8)
        // find exactly the generator's grains.
        let sample = generate(&p, 0);
        let grains = sample.truth.grains.unwrap();
        assert_eq!(grains, out.stats.grains);
        assert!(grains > 5);
        assert_eq!(mask_components(&sample.mask, 0, false), grains, "4-conn");
        assert_eq!(mask_components(&sample.mask, 0, true), grains, "8-conn");
    }
}

#[test]
fn polycrystal_truth_is_consistent() {
    let s = generate(
        &params(Structure::Polycrystal, "optical-etched", 256, 200, 4),
        2,
    );
    let t = &s.truth;
    let grains = t.grains.unwrap();
    let edge = t.grains_touching_edge.unwrap();
    assert!(edge > 0 && edge < grains);
    let interior = s.mask.histogram()[0] as f64;
    assert!((t.mean_grain_area_px.unwrap() * grains as f64 - interior).abs() < 1e-6);
    // Mean grain diameter 40 px: about (256·200)/(π·20²) ≈ 40 grains, more with twins; the interior
    // area excludes the boundaries.
    assert!((25..=110).contains(&grains), "{grains} grains");
    assert!(t.phase_fractions.is_none() && t.particle_counts.is_none());
    assert_eq!(
        (t.seed, t.index, t.style.as_str()),
        (4, 2, "optical-etched")
    );
}

#[test]
fn precipitate_fractions_match_the_mask_and_counts_are_plausible() {
    for seed in 0..4u64 {
        let s = generate(
            &params(Structure::Precipitates, "sem-bse", 384, 320, seed),
            0,
        );
        let t = &s.truth;
        let f = t.phase_fractions.as_ref().unwrap();
        assert_eq!(f.len(), 3);
        assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        // Like aged superalloys (and the nasa-super images): γ′ about 0.3–0.55, tertiary a few %.
        assert!(f[1] > 0.3 && f[1] < 0.6, "secondary γ′ {}", f[1]);
        assert!(f[2] > 0.005 && f[2] < 0.05, "tertiary γ′ {}", f[2]);
        let hist = s.mask.histogram();
        let n = s.mask.data.len() as f64;
        for k in 0..3 {
            let from_mask = hist[k] as f64 / n;
            assert!(
                (from_mask - f[k]).abs() < 0.005,
                "seed {seed} class {k}: geometry {} mask {from_mask}",
                f[k]
            );
        }
        let counts = t.particle_counts.as_ref().unwrap();
        assert_eq!(counts[0], 0);
        // Mask components: a particle cut by the image border may show as two pieces, never fewer.
        let c1 = mask_components(&s.mask, 1, true);
        let c2 = mask_components(&s.mask, 2, true);
        assert!(
            c1 >= counts[1] && c1 <= counts[1] + 3,
            "{c1} vs {}",
            counts[1]
        );
        assert_eq!(
            c2, counts[2],
            "tertiary particles are discs, never cut in two"
        );
        assert!(t.grains.is_none());
    }
}

#[test]
fn style_files_load_and_bad_ones_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("lab-b.toml");
    std::fs::write(&good, "base = \"hazy\"\nblur_sigma = 3.0\n").unwrap();
    let style = Style::from_name_or_path(good.to_str().unwrap()).unwrap();
    assert_eq!(style.name, "lab-b");
    assert_eq!(style.blur_sigma, 3.0);
    assert_eq!(style.vignetting, Style::preset("hazy").unwrap().vignetting);

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[texture]\nscale_px = 0.0\n").unwrap();
    let err = Style::from_toml_file(&bad).unwrap_err().to_string();
    assert!(
        err.contains("bad.toml") && err.contains("texture.scale_px"),
        "{err}"
    );
    std::fs::write(&bad, "[noise]\npoison_counts = 5\n").unwrap();
    let err = Style::from_toml_file(&bad).unwrap_err().to_string();
    assert!(err.contains("poison_counts"), "{err}");
    let err = Style::from_name_or_path("no-such-lab")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no-such-lab") && err.contains("optical-etched"),
        "{err}"
    );
    let missing = dir.path().join("missing.toml");
    let err = Style::from_name_or_path(missing.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.toml"), "{err}");
}

#[test]
fn eight_bit_is_rounded_sixteen_bit() {
    assert_eq!(to_u8(0), 0);
    assert_eq!(to_u8(127), 0);
    assert_eq!(to_u8(128), 1);
    assert_eq!(to_u8(0x7f80), 0x80);
    assert_eq!(to_u8(65535), 255);
}

#[test]
fn dataset_in_tiff16_is_deterministic() {
    let p = params(Structure::Precipitates, "fast-scan", 96, 80, 2);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_dataset(&p, 2, OutputFormat::Tiff16, a.path(), None).unwrap();
    let summary = write_dataset(&p, 2, OutputFormat::Tiff16, b.path(), None).unwrap();
    assert_eq!(
        summary.stems,
        ["precipitates-fast-scan-0000", "precipitates-fast-scan-0001"]
    );
    for stem in &summary.stems {
        let rel = format!("images/{stem}.tif");
        let (x, y) = (
            std::fs::read(a.path().join(&rel)).unwrap(),
            std::fs::read(b.path().join(&rel)).unwrap(),
        );
        assert_eq!(x, y);
        // It decodes as 16-bit gray with the generator's values.
        let img = image::open(a.path().join(&rel)).unwrap().into_luma16();
        let index: u64 = stem[stem.len() - 4..].parse().unwrap();
        assert_eq!(img.into_raw(), generate(&p, index).image);
    }
    let manifest = DatasetManifest::load(&a.path().join("dataset.toml")).unwrap();
    assert_eq!(manifest.num_classes(), 3);
    assert!(manifest.source.unwrap().contains("--format tiff16"));
    assert!(write_dataset(&p, 0, OutputFormat::Png, a.path(), None).is_err());
}
