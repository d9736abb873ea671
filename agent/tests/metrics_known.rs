//! Metrics on small hand-made masks whose answers are worked out by hand in the comments.

use microfed::mask::Mask;
use microfed::metrics::{
    BoundaryCounts, ConfusionMatrix, Evaluator, MetricsError, boundary_pixels,
};

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-12)
}

fn mask(width: u32, rows: &[&[u8]]) -> Mask {
    let data: Vec<u8> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Mask::new(width, rows.len() as u32, data)
}

/// Vertical split: columns < `at` are class 0, the rest class 1.
fn split(w: u32, h: u32, at: u32) -> Mask {
    let data = (0..h)
        .flat_map(|_| (0..w).map(move |x| u8::from(x >= at)))
        .collect();
    Mask::new(w, h, data)
}

#[test]
fn iou_dice_accuracy_by_hand() {
    // truth 0 0 1 1
    // pred  0 1 1 1
    // matrix (row truth): t0: p0=1, p1=1; t1: p0=0, p1=2.
    // class 0: TP 1, FP 0, FN 1 → IoU 1/2, Dice 2/3.
    // class 1: TP 2, FP 1, FN 0 → IoU 2/3, Dice 4/5.
    // mean IoU (1/2 + 2/3)/2 = 7/12; pixel accuracy 3/4.
    let truth = mask(4, &[&[0, 0, 1, 1]]);
    let pred = mask(4, &[&[0, 1, 1, 1]]);
    let mut m = ConfusionMatrix::new(2).unwrap();
    m.add(&truth, &pred).unwrap();
    assert_eq!(m.rows(), vec![vec![1, 1], vec![0, 2]]);
    assert!(close(m.iou(0), 0.5));
    assert!(close(m.iou(1), 2.0 / 3.0));
    assert!(close(m.dice(0), 2.0 / 3.0));
    assert!(close(m.dice(1), 0.8));
    assert!(close(m.mean_iou(), 7.0 / 12.0));
    assert!(close(m.mean_dice(), (2.0 / 3.0 + 0.8) / 2.0));
    assert!(close(m.pixel_accuracy(), 0.75));
}

#[test]
fn ignore_pixels_and_absent_classes() {
    // K = 3. truth 0 255 1 ; pred 1 0 1. The middle pixel is ignored (its prediction too).
    // matrix: t0→p1 = 1, t1→p1 = 1 (2 pixels counted).
    // class 0: TP 0, FP 0, FN 1 → IoU 0. class 1: TP 1, FP 1, FN 0 → IoU 1/2.
    // class 2: in neither truth nor prediction → no IoU, left out of the mean.
    // mean IoU = (0 + 1/2)/2 = 1/4; pixel accuracy 1/2.
    let truth = mask(3, &[&[0, 255, 1]]);
    let pred = mask(3, &[&[1, 0, 1]]);
    let mut m = ConfusionMatrix::new(3).unwrap();
    m.add(&truth, &pred).unwrap();
    assert_eq!(m.total(), 2);
    assert!(close(m.iou(0), 0.0));
    assert!(close(m.iou(1), 0.5));
    assert_eq!(m.iou(2), None);
    assert_eq!(m.dice(2), None);
    assert!(close(m.mean_iou(), 0.25));
    assert!(close(m.pixel_accuracy(), 0.5));
}

#[test]
fn pooling_over_images_equals_one_big_image() {
    // Image A: truth 0 0 ; pred 0 1.  Image B: truth 1 1 ; pred 1 1.
    // Pooled: t0→p0 1, t0→p1 1, t1→p1 2: the same matrix as the first test, IoU 1/2 and 2/3.
    // (Averaging per-image mean IoUs would give ((1/2 + 0)/2 + 1)/2 = 5/8 instead of 7/12.)
    let mut e = Evaluator::new(2, 0.0).unwrap();
    let a = e
        .add("a", &mask(2, &[&[0, 0]]), &mask(2, &[&[0, 1]]))
        .unwrap();
    // Image A alone: class 0 IoU 1/2, class 1 IoU 0/(0+1+0) = 0 → mean 1/4.
    assert!(close(a.mean_iou, 0.25));
    e.add("b", &mask(2, &[&[1, 1]]), &mask(2, &[&[1, 1]]))
        .unwrap();
    let r = e.finish(&["interior".into(), "boundary".into()]);
    assert_eq!(r.images, 2);
    assert_eq!(r.pixels, 4);
    assert!(close(r.mean_iou, 7.0 / 12.0));
    assert_eq!(r.classes[1].name, "boundary");
    assert_eq!(
        (r.classes[0].truth_pixels, r.classes[0].pred_pixels),
        (2, 1)
    );
    assert_eq!(r.confusion, vec![vec![1, 1], vec![0, 2]]);
}

#[test]
fn bad_pairs_are_refused_and_add_nothing() {
    let mut e = Evaluator::new(2, 1.0).unwrap();
    let t = mask(2, &[&[0, 1]]);
    assert!(matches!(
        e.add("x", &t, &mask(3, &[&[0, 1, 1]])),
        Err(MetricsError::SizeMismatch { .. })
    ));
    assert!(matches!(
        e.add("x", &t, &mask(2, &[&[0, 2]])),
        Err(MetricsError::ClassOutOfRange {
            which: "prediction",
            value: 2,
            x: 1,
            y: 0,
            ..
        })
    ));
    assert!(matches!(
        e.add("x", &t, &mask(2, &[&[0, 255]])),
        Err(MetricsError::ClassOutOfRange {
            which: "prediction",
            value: 255,
            ..
        })
    ));
    assert!(matches!(
        e.add("x", &mask(2, &[&[0, 9]]), &t),
        Err(MetricsError::ClassOutOfRange {
            which: "truth",
            value: 9,
            ..
        })
    ));
    assert_eq!(e.matrix().total(), 0);
    assert!(Evaluator::new(2, -1.0).is_err());
    assert!(Evaluator::new(2, f64::NAN).is_err());
    assert!(ConfusionMatrix::new(0).is_err());
}

#[test]
fn boundary_pixels_are_4_neighbour_changes() {
    // 0 0 1
    // 0 0 1
    // 2 0 1
    // (1,0),(1,1),(1,2) touch class 1 on the right; (2,*) touch class 0 on the left;
    // (0,2) is class 2 next to 0s; (0,1) is above the 2, (1,2) is right of it.
    let m = mask(3, &[&[0, 0, 1], &[0, 0, 1], &[2, 0, 1]]);
    let b = boundary_pixels(&m, None);
    #[rustfmt::skip]
    let expected = vec![
        false, true, true,
        true,  true, true,
        true,  true, true,
    ];
    assert_eq!(b, expected);
    // With the 2 turned into ignore (in the truth), the ignored pixel is no boundary and does not
    // make its neighbours boundary: (0,1) is no longer one; (1,2) still is (class 1 on its right).
    let t = mask(3, &[&[0, 0, 1], &[0, 0, 1], &[255, 0, 1]]);
    let b = boundary_pixels(&t, Some(&t));
    #[rustfmt::skip]
    let expected = vec![
        false, true, true,
        false, true, true,
        false, true, true,
    ];
    assert_eq!(b, expected);
}

#[test]
fn boundary_f1_of_shifted_straight_edges() {
    // 6×4, truth split at column 3: boundary pixels are columns 2 and 3 (8 pixels).
    let truth = split(6, 4, 3);
    // Prediction split at column 4: boundary columns 3 and 4 (8 pixels).
    let pred = split(6, 4, 4);
    // tol 0: predicted column 3 lies on the truth (4 of 8) → P = 1/2; true column 3 lies on the
    // prediction (4 of 8) → R = 1/2; F1 = 1/2.
    let c = BoundaryCounts::of(&truth, &pred, 0.0);
    assert_eq!(
        (c.pred_total, c.pred_matched, c.truth_total, c.truth_matched),
        (8, 4, 8, 4)
    );
    assert!(close(c.f1(), 0.5));
    // tol 1: predicted column 4 is 1 px from true column 3, true column 2 is 1 px from predicted
    // column 3 → P = R = F1 = 1.
    assert!(close(BoundaryCounts::of(&truth, &pred, 1.0).f1(), 1.0));

    // Split at column 5 (boundary columns 4, 5). tol 1: predicted column 4 matched (1 px from 3),
    // column 5 not (2 px) → P = 1/2; true column 3 matched, column 2 not (2 px from 4) → R = 1/2.
    let far = split(6, 4, 5);
    let c = BoundaryCounts::of(&truth, &far, 1.0);
    assert!(close(c.precision(), 0.5) && close(c.recall(), 0.5) && close(c.f1(), 0.5));
    // tol 2: everything within 2 px → F1 = 1.
    assert!(close(BoundaryCounts::of(&truth, &far, 2.0).f1(), 1.0));
}

#[test]
fn boundary_tolerance_is_euclidean_not_chessboard() {
    // 5×5 class 0 with one class-1 pixel: truth at (2,2), prediction at (3,3).
    // Truth boundary: (2,2) and its 4-neighbours (2,1),(1,2),(3,2),(2,3) → 5 pixels.
    // Predicted boundary: (3,3),(3,2),(2,3),(4,3),(3,4) → 5 pixels; (3,2) and (2,3) are shared.
    // tol 1: predicted (3,3) is 1 px from truth (3,2) ✓; (4,3) is √2 from (3,2) ✗; (3,4) is √2 from
    // (2,3) ✗ → P = 3/5. Symmetrically R = 3/5 → F1 = 3/5. (A chessboard tolerance of 1 would give 1.)
    let mut t = vec![0u8; 25];
    t[2 * 5 + 2] = 1;
    let mut p = vec![0u8; 25];
    p[3 * 5 + 3] = 1;
    let (t, p) = (Mask::new(5, 5, t), Mask::new(5, 5, p));
    let c = BoundaryCounts::of(&t, &p, 1.0);
    assert_eq!((c.pred_total, c.pred_matched), (5, 3));
    assert_eq!((c.truth_total, c.truth_matched), (5, 3));
    assert!(close(c.f1(), 0.6));
    // tol 1.5 ≥ √2 ≈ 1.414: every pixel matched → F1 = 1.
    assert!(close(BoundaryCounts::of(&t, &p, 1.5).f1(), 1.0));
}

#[test]
fn boundary_f1_edge_cases() {
    let flat = Mask::filled(4, 4, 0);
    // Nothing to score on either side.
    assert_eq!(BoundaryCounts::of(&flat, &flat, 2.0).f1(), None);
    // True boundary but none predicted: recall 0, precision undefined → F1 0.
    let c = BoundaryCounts::of(&split(4, 4, 2), &flat, 2.0);
    assert_eq!(c.precision(), None);
    assert!(close(c.recall(), 0.0));
    assert!(close(c.f1(), 0.0));
    // A boundary predicted inside an ignored region counts for nothing.
    let ignored = Mask::filled(4, 4, 255);
    let c = BoundaryCounts::of(&ignored, &split(4, 4, 2), 0.0);
    assert_eq!(c, BoundaryCounts::default());
}

/// `microfed eval` matches files by stem across formats and writes the same numbers as JSON.
#[test]
fn cli_eval_writes_json() {
    use microfed::cli::eval::{Args, run};
    let tmp = tempfile::tempdir().unwrap();
    let (truth, pred) = (tmp.path().join("truth"), tmp.path().join("pred"));
    std::fs::create_dir_all(truth.join("masks")).unwrap();
    std::fs::create_dir_all(&pred).unwrap();
    // One image: the first test's masks (mean IoU 7/12, accuracy 3/4).
    mask(4, &[&[0, 0, 1, 1]])
        .save_png(&truth.join("masks/a.png"))
        .unwrap();
    image::GrayImage::from_raw(4, 1, vec![0, 1, 1, 1])
        .unwrap()
        .save(pred.join("a.tif"))
        .unwrap();
    let out = tmp.path().join("eval.json");
    let args = |pred: &std::path::Path| Args {
        pred: pred.to_owned(),
        truth: truth.clone(),
        classes: None,
        tolerance: 1.0,
        json: Some(out.clone()),
    };
    run(args(&pred)).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!((v["mean_iou"].as_f64().unwrap() - 7.0 / 12.0).abs() < 1e-12);
    assert!((v["pixel_accuracy"].as_f64().unwrap() - 0.75).abs() < 1e-12);
    assert_eq!(v["classes"][1]["name"], "class 1");
    // A truth mask without prediction is an error naming its stem.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = run(args(&empty)).unwrap_err();
    assert!(err.to_string().contains(": a"), "{err}");
}
