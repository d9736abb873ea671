//! Tiled segmentation against the whole image, through tract.
//!
//! The stitched logits of an image cut into tiles are compared with the logits of the whole image in
//! one run (padded the same way). With tiles starting on multiples of 16 and every pixel taken from
//! where it is at least overlap/2 from a tile edge, the only difference is the zero padding that a
//! tile's border sees instead of real context; it fades with distance from the edge. The test
//! measures the difference for several overlaps, asserts it shrinks as the overlap grows, and bounds
//! it for the default-like overlap (numbers in docs/bench-segment.md).

use microfed::micrograph::{Micrograph, Normalisation};
use microfed::model::onnx;
use microfed::model::runtime::Segmenter;
use microfed::pipeline::tiling::{self, Logits};
use rand::{Rng, SeedableRng};
use tract_linalg::multithread::Executor;

fn model(dir: &std::path::Path, classes: usize, seed: u64) -> Segmenter {
    let p = microfed_kernels::unet::Params::init(classes, seed).unwrap();
    let path = dir.join(format!("m{seed}.onnx"));
    onnx::save(&onnx::export(&p, &vec![]).unwrap(), &path).unwrap();
    Segmenter::load(&path).unwrap()
}

/// A smooth random image (sums of a few waves plus noise), so the network sees structure.
fn image(w: u32, h: u32, seed: u64) -> Micrograph {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let waves: Vec<(f32, f32, f32)> = (0..6)
        .map(|_| {
            (
                rng.random_range(0.02..0.2),
                rng.random_range(0.02..0.2),
                rng.random_range(0.0..std::f32::consts::TAU),
            )
        })
        .collect();
    let unit: Vec<f32> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x as f32, y as f32)))
        .map(|(x, y)| {
            let s: f32 = waves
                .iter()
                .map(|&(a, b, p)| (a * x + b * y + p).sin())
                .sum();
            (0.5 + s / 12.0 + rng.random_range(-0.05..0.05)).clamp(0.0, 1.0)
        })
        .collect();
    Micrograph::from_unit(w, h, &unit, &Normalisation::default()).unwrap()
}

fn max_abs(l: &Logits) -> f32 {
    l.data.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

fn compare(a: &Logits, b: &Logits) -> (f32, f64) {
    assert_eq!(
        (a.width, a.height, a.classes),
        (b.width, b.height, b.classes)
    );
    let d = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    let (ma, mb) = (a.to_mask().unwrap(), b.to_mask().unwrap());
    let agree = ma.data.iter().zip(&mb.data).filter(|(x, y)| x == y).count();
    (d, agree as f64 / ma.data.len() as f64)
}

#[test]
fn stitched_tiles_match_the_whole_image() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = model(tmp.path(), 3, 11);
    // Not multiples of 16: both the padding and the crop are exercised.
    let img = image(250, 200, 5);
    let one = Executor::SingleThread;
    let whole = tiling::segment_logits(&seg, &img, 256, 0, 1, &one).unwrap();
    assert_eq!((whole.width, whole.height), (250, 200));
    let scale = max_abs(&whole);
    assert!(scale > 1e-3, "degenerate logits would prove nothing");

    // A tile at least as large as the padded image is the whole-image run itself: identical.
    let same = tiling::segment_logits(&seg, &img, 256, 32, 2, &one).unwrap();
    assert_eq!(same, whole);

    let mut last = f32::INFINITY;
    for overlap in [16, 32, 48] {
        let tiled = tiling::segment_logits(&seg, &img, 128, overlap, 3, &one).unwrap();
        let (d, agree) = compare(&tiled, &whole);
        eprintln!(
            "tile 128, overlap {overlap}: max |tiled − whole| = {d:.2e} ({:.2e} of max |logit| \
             {scale:.3}), mask agreement {:.4}",
            d / scale,
            agree
        );
        assert!(
            d <= last * 1.0001,
            "difference must not grow with the overlap"
        );
        last = d;
        // Measured: 3e-5 (overlap 32) and 1e-5 (48) of the largest logit; masks identical.
        if overlap >= 32 {
            assert!(
                d / scale < 1e-3,
                "overlap {overlap}: relative difference {}",
                d / scale
            );
            assert!(agree >= 0.999, "overlap {overlap}: masks agree on {agree}");
        }
    }
}

#[test]
fn batching_and_threads_do_not_change_the_result() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = model(tmp.path(), 2, 3);
    let img = image(200, 150, 9);
    let one = Executor::SingleThread;
    let a = tiling::segment_logits(&seg, &img, 96, 32, 1, &one).unwrap();
    let b = tiling::segment_logits(&seg, &img, 96, 32, 4, &tiling::executor(2).unwrap()).unwrap();
    let (d, agree) = compare(&a, &b);
    eprintln!("batch 1 vs batch 4 on 2 threads: max diff {d:.2e}, agreement {agree}");
    assert!(d <= 1e-4 * max_abs(&a).max(1.0), "{d}");
}
