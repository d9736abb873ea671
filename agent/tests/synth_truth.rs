//! The foundation's acceptance: on 50 generated images of each structure, the features measured from the
//! ground-truth masks match what the generator knows it drew: grain count within 2%, phase fractions
//! within 0.5 percentage points. The two sides are computed independently: the generator counts regions
//! in its own region map and integrates particle shapes (4×4 supersampled); `features` runs connected
//! components and counts mask pixels.

use microfed::features::{FeatureOptions, Figures, GrainClasses, grain_features, phase_features};
use microfed::synth::{Structure, Style, SynthParams, generate};
use rayon::prelude::*;

const IMAGES: u64 = 50;

#[test]
fn grain_counts_from_masks_match_the_generator_within_2_percent() {
    // Several styles and boundary widths: the geometry is the same in every style, the widths differ.
    let cases: Vec<(String, u32, u64)> = (0..IMAGES)
        .map(|i| {
            (
                Style::PRESETS[i as usize % Style::PRESETS.len()].to_string(),
                1 + (i % 5) as u32,
                i,
            )
        })
        .collect();
    let results: Vec<(u32, usize, u32, usize)> = cases
        .par_iter()
        .map(|(style, bw, i)| {
            let params = SynthParams::new(
                Structure::Polycrystal,
                Style::preset(style).unwrap(),
                384,
                320,
                11,
            )
            .unwrap()
            .with_boundary_width(*bw)
            .unwrap();
            let s = generate(&params, *i);
            let f = grain_features(
                "synthetic",
                &s.mask,
                2,
                GrainClasses::default(),
                &FeatureOptions::default(),
            )
            .unwrap();
            let Figures::Grains(g) = f.figures else {
                panic!("grain figures expected")
            };
            (
                s.truth.grains.unwrap(),
                g.grains,
                s.truth.grains_touching_edge.unwrap(),
                g.edge_grains,
            )
        })
        .collect();
    let (mut truth_total, mut measured_total) = (0u64, 0u64);
    for (i, &(truth, measured, truth_edge, measured_edge)) in results.iter().enumerate() {
        let err = (measured as f64 - truth as f64).abs() / truth as f64;
        assert!(
            err <= 0.02,
            "image {i}: {measured} grains measured, {truth} drawn ({:.1}% off)",
            err * 100.0
        );
        assert_eq!(
            measured_edge as u32, truth_edge,
            "image {i}: grains cut by the edge"
        );
        truth_total += truth as u64;
        measured_total += measured as u64;
    }
    eprintln!("{IMAGES} polycrystals: {measured_total} grains measured, {truth_total} drawn");
    assert!(
        truth_total > 50 * IMAGES,
        "too few grains per image for a meaningful count: {truth_total}"
    );
}

#[test]
fn phase_fractions_from_masks_match_the_drawn_shapes_within_half_a_point() {
    let names: Vec<String> = Structure::Precipitates
        .classes()
        .into_iter()
        .map(|c| c.name)
        .collect();
    let worst = (0..IMAGES)
        .into_par_iter()
        .map(|i| {
            let style = Style::PRESETS[i as usize % Style::PRESETS.len()];
            let params = SynthParams::new(
                Structure::Precipitates,
                Style::preset(style).unwrap(),
                320,
                384,
                5,
            )
            .unwrap();
            let s = generate(&params, i);
            let truth = s.truth.phase_fractions.clone().unwrap();
            let f =
                phase_features("synthetic", &s.mask, &names, &FeatureOptions::default()).unwrap();
            let Figures::Phases(p) = f.figures else {
                panic!("phase figures expected")
            };
            let mut worst = 0.0f64;
            for (c, stats) in p.phases.iter().enumerate() {
                let diff_points = (stats.area_fraction - truth[c]).abs() * 100.0;
                assert!(
                    diff_points <= 0.5,
                    "image {i}, class {c} ({}): mask {:.3}% vs drawn {:.3}%",
                    stats.name,
                    stats.area_fraction * 100.0,
                    truth[c] * 100.0
                );
                worst = worst.max(diff_points);
            }
            // Every class is present: a structure without small particles would make the check empty.
            assert!(
                truth.iter().all(|&f| f > 0.0),
                "image {i}: a class is missing: {truth:?}"
            );
            worst
        })
        .reduce(|| 0.0, f64::max);
    eprintln!(
        "{IMAGES} precipitate images: worst phase-fraction difference {worst:.3} percentage points"
    );
}
