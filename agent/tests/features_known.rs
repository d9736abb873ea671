//! Microstructure figures of small hand-made masks; the expected numbers are worked out in comments.

use microfed::classes::ClassDef;
use microfed::features::{
    Connectivity, FeatureKind, FeatureOptions, Features, FeaturesError, Figures, GrainClasses,
    GrainFeatures, PhaseFeatures, SizeStats, connected_components, grain_features, phase_features,
};
use microfed::mask::Mask;

fn mask(rows: &[&[u8]]) -> Mask {
    let w = rows[0].len() as u32;
    Mask::new(
        w,
        rows.len() as u32,
        rows.iter().flat_map(|r| r.iter().copied()).collect(),
    )
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

fn grains(f: &Features) -> &GrainFeatures {
    match &f.figures {
        Figures::Grains(g) => g,
        Figures::Phases(_) => panic!("expected grains"),
    }
}

fn phases(f: &Features) -> &PhaseFeatures {
    match &f.figures {
        Figures::Phases(p) => p,
        Figures::Grains(_) => panic!("expected phases"),
    }
}

/// 7×7: a closed 1-px boundary ring around a 3×3 grain, inside an outer grain that fills the rest.
fn ring() -> Mask {
    mask(&[
        &[0, 0, 0, 0, 0, 0, 0],
        &[0, 1, 1, 1, 1, 1, 0],
        &[0, 1, 0, 0, 0, 1, 0],
        &[0, 1, 0, 0, 0, 1, 0],
        &[0, 1, 0, 0, 0, 1, 0],
        &[0, 1, 1, 1, 1, 1, 0],
        &[0, 0, 0, 0, 0, 0, 0],
    ])
}

#[test]
fn ring_grain_areas_shares_and_jeffries_count() {
    let f = grain_features(
        "ring",
        &ring(),
        2,
        GrainClasses::default(),
        &FeatureOptions::default(),
    )
    .unwrap();
    let g = grains(&f);
    // Two grains: the inner 3×3 (complete) and the outer frame (touches all edges and corners).
    assert_eq!(
        (g.grains, g.complete_grains, g.edge_grains, g.corner_grains),
        (2, 1, 1, 1)
    );
    // Every one of the 16 ring pixels has both grains in its 8-neighbourhood (the ring's corner
    // (1,1) sees the inner (2,2) diagonally) → ½ pixel to each. Inner area = 9 + 16·½ = 17 px².
    assert!(close(g.mean_grain_area.unwrap(), 17.0, 1e-12));
    // ECD = 2·√(17/π) = 4.652426 px.
    let ecd = g.ecd.as_ref().unwrap();
    assert_eq!(ecd.count, 1);
    assert!(close(ecd.mean, 4.652_426_49, 1e-8));
    assert_eq!(ecd.std, 0.0);
    // boundary fraction 16/49.
    assert!(close(g.boundary_fraction, 16.0 / 49.0, 1e-12));
    // Jeffries: 1 inside + the outer grain covering 4 corners counted ¼ each = 2; N_A = 2/49 px⁻².
    assert!(close(g.jeffries_count, 2.0, 1e-12));
    assert!(close(g.grains_per_area, 2.0 / 49.0, 1e-15));
    assert!(close(g.planimetric_mean_area.unwrap(), 24.5, 1e-12));
    assert_eq!(g.astm_g, None); // no pixel size, no G
    assert_eq!(f.length_unit, "px");

    // With 2 µm pixels: lengths ×2, areas ×4; N_A = 2/(49·4 µm²) = 2/196e-6 mm² = 10 204.08 mm⁻²;
    // G = 3.321928·log10(10 204.08) − 2.954 = 3.321928·4.008774 − 2.954 = 10.36286.
    let opts = FeatureOptions {
        pixel_size_um: Some(2.0),
        ..FeatureOptions::default()
    };
    let f = grain_features("ring", &ring(), 2, GrainClasses::default(), &opts).unwrap();
    let g = grains(&f);
    assert_eq!(f.length_unit, "um");
    assert!(close(g.mean_grain_area.unwrap(), 68.0, 1e-12));
    assert!(close(
        g.ecd.as_ref().unwrap().mean,
        2.0 * 4.652_426_49,
        1e-7
    ));
    assert!(close(g.astm_g.unwrap(), 10.362_86, 1e-4));
}

#[test]
fn astm_g_of_two_edge_grains() {
    // 7×5, boundary column 3: two grains of 15 interior px each, both cut by the edge, each covering
    // 2 corners → Jeffries count 4·¼ = 1. Each gets 5·½ boundary px → 17.5 px² (not in the stats).
    // 10 µm pixels: image 35·100 µm² = 0.0035 mm² → N_A = 285.714 mm⁻²;
    // G = 3.321928·log10(285.714) − 2.954 = 3.321928·2.455932 − 2.954 = 5.204429.
    let row: &[u8] = &[0, 0, 0, 1, 0, 0, 0];
    let m = mask(&[row, row, row, row, row]);
    let opts = FeatureOptions {
        pixel_size_um: Some(10.0),
        ..FeatureOptions::default()
    };
    let f = grain_features("two", &m, 2, GrainClasses::default(), &opts).unwrap();
    let g = grains(&f);
    assert_eq!(
        (g.grains, g.complete_grains, g.edge_grains, g.corner_grains),
        (2, 0, 2, 2)
    );
    assert_eq!(g.mean_grain_area, None);
    assert!(g.ecd.is_none());
    assert!(close(g.jeffries_count, 1.0, 1e-12));
    assert!(close(g.astm_g.unwrap(), 5.204_429, 1e-6));
}

#[test]
fn diagonal_boundaries_do_not_merge_grains() {
    // A 1-px 8-connected diagonal boundary. 4-connectivity keeps the two sides apart; 8-connectivity
    // would join (1,0) and (2,1) across the diagonal.
    let m = mask(&[&[0, 0, 1], &[0, 1, 0], &[1, 0, 0]]);
    let f = grain_features(
        "diag",
        &m,
        2,
        GrainClasses::default(),
        &FeatureOptions::default(),
    )
    .unwrap();
    assert_eq!(grains(&f).grains, 2);
    assert_eq!(connected_components(&m, 0, Connectivity::Eight).count(), 1);
}

#[test]
fn grain_classes_by_name_and_kind_guess() {
    let defs = |names: &[&str]| -> Vec<ClassDef> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| ClassDef {
                index: i as u8,
                name: (*n).into(),
                color: [0; 3],
            })
            .collect()
    };
    let swapped = defs(&["grain boundary", "grain interior"]);
    assert_eq!(
        GrainClasses::from_classes(&swapped),
        GrainClasses {
            interior: 1,
            boundary: 0
        }
    );
    assert_eq!(FeatureKind::guess(&swapped, true), FeatureKind::Grains);
    let nasa = defs(&["γ matrix", "secondary γ′", "tertiary γ′"]);
    assert_eq!(FeatureKind::guess(&nasa, true), FeatureKind::Phases);
    let two_phase = defs(&["matrix", "precipitate"]);
    assert_eq!(FeatureKind::guess(&two_phase, true), FeatureKind::Phases);
    let unnamed = defs(&["class 0", "class 1"]);
    assert_eq!(FeatureKind::guess(&unnamed, false), FeatureKind::Grains);
    assert_eq!(
        "Phases".parse::<FeatureKind>().unwrap(),
        FeatureKind::Phases
    );
    assert!("pores".parse::<FeatureKind>().is_err());

    // Swapped classes measure the same ring with 0 and 1 exchanged.
    let mut inv = ring();
    inv.data.iter_mut().for_each(|v| *v = 1 - *v);
    let f = grain_features(
        "inv",
        &inv,
        2,
        GrainClasses::from_classes(&swapped),
        &FeatureOptions::default(),
    )
    .unwrap();
    assert!(close(grains(&f).mean_grain_area.unwrap(), 17.0, 1e-12));
}

/// 8×6 phase mask:
/// ```text
/// 0 0 0 0 0 0 0 0
/// 0 1 1 0 0 0 0 0
/// 0 1 1 0 0 0 0 0
/// 0 0 0 1 0 0 0 0
/// 0 0 0 0 0 0 1 1
/// 0 0 0 0 0 0 1 1
/// ```
fn particles() -> Mask {
    mask(&[
        &[0, 0, 0, 0, 0, 0, 0, 0],
        &[0, 1, 1, 0, 0, 0, 0, 0],
        &[0, 1, 1, 0, 0, 0, 0, 0],
        &[0, 0, 0, 1, 0, 0, 0, 0],
        &[0, 0, 0, 0, 0, 0, 1, 1],
        &[0, 0, 0, 0, 0, 0, 1, 1],
    ])
}

#[test]
fn phase_fractions_and_particles() {
    let names = vec!["matrix".to_string(), "precipitate".to_string()];
    let f = phase_features("p", &particles(), &names, &FeatureOptions::default()).unwrap();
    let p = phases(&f);
    assert_eq!(p.analysed_pixels, 48);
    let (m, ppt) = (&p.phases[0], &p.phases[1]);
    // 9 precipitate pixels of 48 → 0.1875; matrix 39/48 = 0.8125.
    assert!(close(ppt.area_fraction, 0.1875, 1e-12));
    assert!(close(m.area_fraction, 0.8125, 1e-12));
    // 8-connected: the 2×2 block and the diagonal pixel (3,3) form one complete particle of 5 px;
    // the 2×2 block at the bottom-right corner touches the edge.
    assert_eq!((ppt.particles, ppt.edge_particles), (2, 1));
    assert!(close(ppt.mean_particle_area.unwrap(), 5.0, 1e-12));
    // ECD = 2·√(5/π) = 2.523133.
    assert!(close(ppt.ecd.as_ref().unwrap().median, 2.523_132_52, 1e-8));
    // Number density (1 + ½)/48 = 0.03125 px⁻².
    assert!(close(ppt.number_density, 0.03125, 1e-15));
    // The matrix is one connected phase touching the edge: no complete particle, no size stats.
    assert_eq!((m.particles, m.edge_particles), (1, 1));
    assert!(m.ecd.is_none());

    // 0.5 µm pixels: ECD 1.261566 µm, density 1.5/(48·0.25 µm²) = 0.125 µm⁻².
    let opts = FeatureOptions {
        pixel_size_um: Some(0.5),
        ..FeatureOptions::default()
    };
    let f = phase_features("p", &particles(), &names, &opts).unwrap();
    let ppt = &phases(&f).phases[1];
    assert!(close(ppt.ecd.as_ref().unwrap().mean, 1.261_566_26, 1e-8));
    assert!(close(ppt.number_density, 0.125, 1e-12));
    assert!(close(ppt.mean_particle_area.unwrap(), 1.25, 1e-12));
}

#[test]
fn ignored_pixels_are_outside_the_analysed_area() {
    // 2×2: one ignored pixel, one matrix, two precipitate → fractions 1/3 and 2/3.
    let m = mask(&[&[255, 0], &[1, 1]]);
    let names = vec!["a".to_string(), "b".to_string()];
    let f = phase_features("i", &m, &names, &FeatureOptions::default()).unwrap();
    let p = phases(&f);
    assert_eq!(p.analysed_pixels, 3);
    assert!(close(p.phases[1].area_fraction, 2.0 / 3.0, 1e-12));
}

#[test]
fn size_stats_by_hand() {
    // 1 2 3 4 10: mean 4, median 3, sample variance (9+4+1+0+36)/4 = 12.5 → std 3.535534.
    // 3 bins of width 3 from 1 to 10: [1,4) holds 1 2 3, [4,7) holds 4, [7,10] holds 10.
    let s = SizeStats::of(&[10.0, 2.0, 4.0, 1.0, 3.0], 3)
        .unwrap()
        .unwrap();
    assert_eq!(
        (s.count, s.mean, s.median, s.min, s.max),
        (5, 4.0, 3.0, 1.0, 10.0)
    );
    assert!(close(s.std, 12.5f64.sqrt(), 1e-12));
    assert_eq!(s.histogram.edges, vec![1.0, 4.0, 7.0, 10.0]);
    assert_eq!(s.histogram.counts, vec![3, 1, 1]);
    // Even count: median is the mean of the middle two.
    let s = SizeStats::of(&[1.0, 2.0, 5.0, 9.0], 2).unwrap().unwrap();
    assert_eq!(s.median, 3.5);
    // All equal: one value per bin 0.
    let s = SizeStats::of(&[2.0, 2.0], 4).unwrap().unwrap();
    assert_eq!(s.histogram.counts, vec![2, 0, 0, 0]);
    assert!(SizeStats::of(&[], 3).unwrap().is_none());
    assert!(SizeStats::of(&[1.0], 0).is_err());
}

#[test]
fn bad_input_is_an_error() {
    let opts = FeatureOptions::default();
    let m = mask(&[&[0, 3]]);
    assert!(matches!(
        grain_features("x", &m, 2, GrainClasses::default(), &opts),
        Err(FeaturesError::ClassOutOfRange {
            value: 3,
            x: 1,
            y: 0,
            k: 2
        })
    ));
    let bad_px = FeatureOptions {
        pixel_size_um: Some(-1.0),
        ..opts.clone()
    };
    assert!(matches!(
        grain_features("x", &ring(), 2, GrainClasses::default(), &bad_px),
        Err(FeaturesError::PixelSize(_))
    ));
    let same = GrainClasses {
        interior: 1,
        boundary: 1,
    };
    assert!(grain_features("x", &ring(), 2, same, &opts).is_err());
}

#[test]
fn json_and_csv_agree_in_shape() {
    let opts = FeatureOptions {
        pixel_size_um: Some(2.0),
        ..FeatureOptions::default()
    };
    let f = grain_features("a,b.png", &ring(), 2, GrainClasses::default(), &opts).unwrap();
    let json = serde_json::to_value(&f).unwrap();
    assert_eq!(json["kind"], "grains");
    assert_eq!(json["grains"], 2);
    let back: Features = serde_json::from_value(json).unwrap();
    assert_eq!(back, f);
    let header = f.csv_header();
    let row = f.to_csv_row();
    assert!(
        row.starts_with("\"a,b.png\",grains,7,7,2,um,2,1,1,1,"),
        "{row}"
    );
    // Same number of fields (the quoted name holds one comma).
    assert_eq!(header.split(',').count() + 1, row.split(',').count());
    let names = vec!["γ matrix".to_string(), "tertiary γ′".to_string()];
    let p = phase_features("p.png", &particles(), &names, &FeatureOptions::default()).unwrap();
    assert!(p.csv_header().contains("tertiary_γ__area_fraction"));
    assert_eq!(
        p.csv_header().split(',').count(),
        p.to_csv_row().split(',').count()
    );
    assert_eq!(serde_json::to_value(&p).unwrap()["kind"], "phases");
}

/// `microfed features` writes one CSV row per mask and a JSON array.
#[test]
fn cli_features_csv_and_json() {
    use microfed::cli::features::{Args, run};
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a.png"), tmp.path().join("b.png"));
    ring().save_png(&a).unwrap();
    particles().save_png(&b).unwrap();
    let (csv, json) = (tmp.path().join("f.csv"), tmp.path().join("f.json"));
    run(Args {
        masks: vec![a.clone(), b],
        pixel_size: Some(2.0),
        kind: None, // two unnamed classes → grains
        classes: None,
        bins: 5,
        neck_ratio: 0.5,
        json: Some(json.clone()),
        csv: Some(csv.clone()),
    })
    .unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 3);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v[0]["kind"], "grains");
    assert_eq!(v[0]["grains"], 2);
    assert!((v[0]["astm_g"].as_f64().unwrap() - 10.362_86).abs() < 1e-4);
    // The particle mask read as grains: class 0 is one 4-connected region around the particles,
    // which the neck rule (0.5) cuts in two where particles pinch it (0: one region, below).
    assert_eq!(v[1]["grains"], 2);
    run(Args {
        masks: vec![tmp.path().join("b.png")],
        pixel_size: None,
        kind: None,
        classes: None,
        bins: 5,
        neck_ratio: 0.0,
        json: Some(json.clone()),
        csv: None,
    })
    .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v[0]["grains"], 1);
}
