//! Dataset validation on the real nasa-super folder (when present) and on small folders with planted
//! problems: `Dataset::check` must list every problem, naming exactly the broken files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use image::GrayImage;
use microfed::classes::{ClassDef, DatasetManifest};
use microfed::dataset::{Dataset, DatasetError};

/// The real nasa-super folder: `MICROFED_NASA_SUPER`, else `../shared/data/nasa-super` beside the
/// repository (where CI and the development machines keep it).
fn nasa_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("MICROFED_NASA_SUPER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/nasa-super")
        });
    if dir.join("images").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "{} is absent on this machine: skipping the real-data check",
            dir.display()
        );
        None
    }
}

fn manifest(names: &[&str]) -> DatasetManifest {
    DatasetManifest {
        name: "test".into(),
        description: None,
        pixel_size_um: None,
        source: None,
        license: None,
        color_tolerance: None,
        classes: names
            .iter()
            .enumerate()
            .map(|(i, n)| ClassDef {
                index: i as u8,
                name: (*n).into(),
                color: [i as u8 * 60, 0, 0],
            })
            .collect(),
    }
}

fn nasa_classes(dir: &Path) -> PathBuf {
    let path = dir.join("nasa-classes.toml");
    manifest(&["γ matrix", "secondary γ′", "tertiary γ′"])
        .save(&path)
        .unwrap();
    path
}

/// The file names (not paths) that the problems are about.
fn named_files(problems: &[DatasetError]) -> BTreeSet<String> {
    problems
        .iter()
        .map(|p| {
            p.path()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| panic!("problem names no file: {p}"))
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for e in std::fs::read_dir(from.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(sub).join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn nasa_super_passes_with_classes_given_separately() {
    let Some(dir) = nasa_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let classes = nasa_classes(tmp.path());
    let report = Dataset::check(&dir, Some(&classes));
    assert!(
        report.is_ok(),
        "problems: {:?}",
        report
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    );
    assert_eq!(report.pairs.len(), 18);
    // README: shares about 0.49, 0.49 and 0.025.
    let shares = report.class_shares().unwrap();
    assert!((shares[0] - 0.49).abs() < 0.03, "{shares:?}");
    assert!((shares[1] - 0.49).abs() < 0.03, "{shares:?}");
    assert!((shares[2] - 0.025).abs() < 0.01, "{shares:?}");
    assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-12);

    // Without classes the read-only folder has no dataset.toml: that is a problem, named.
    let bare = Dataset::check(&dir, None);
    assert!(matches!(
        bare.problems.as_slice(),
        [DatasetError::NoClasses { .. }]
    ));

    let ds = Dataset::open(&dir, Some(&classes)).unwrap();
    assert_eq!(ds.len(), 18);
    let (img, mask) = ds.load_pair(0).unwrap();
    assert_eq!((img.width, img.height), (512, 512));
    assert_eq!((mask.width, mask.height), (512, 512));
    assert_eq!(img.bit_depth, 8);
    assert!(matches!(
        ds.load_pair(18),
        Err(DatasetError::NoSuchPair { index: 18, len: 18 })
    ));
}

#[test]
fn planted_problems_in_a_nasa_copy_are_all_named() {
    let Some(dir) = nasa_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let classes = nasa_classes(tmp.path());
    let copy = tmp.path().join("copy");
    copy_dir(&dir, &copy);

    // 1. A mask with class index 7 at one pixel.
    let bad_class = copy.join("masks/super_spot2_0d_0.png");
    let mut m = image::open(&bad_class).unwrap().to_luma8();
    m.put_pixel(10, 20, image::Luma([7]));
    m.save(&bad_class).unwrap();
    // 2. A mask of the wrong size.
    let wrong_size = copy.join("masks/super_spot4_180d_2.png");
    GrayImage::new(256, 512).save(&wrong_size).unwrap();
    // 3. An unreadable image (not an image at all, though named .png).
    let unreadable = copy.join("images/super_spot6_0d_2.png");
    std::fs::write(&unreadable, b"this is not a PNG").unwrap();

    let report = Dataset::check(&copy, Some(&classes));
    let named = named_files(&report.problems);
    let expected: BTreeSet<String> = [
        "super_spot2_0d_0.png",
        "super_spot4_180d_2.png",
        "super_spot6_0d_2.png",
    ]
    .map(String::from)
    .into();
    assert_eq!(named, expected);
    assert_eq!(report.problems.len(), 3, "{:?}", report.problems);
    for p in &report.problems {
        match p {
            DatasetError::ClassOutOfRange {
                mask,
                value,
                x,
                y,
                k,
                count,
            } => {
                assert_eq!(mask, &bad_class);
                assert_eq!((*value, *x, *y, *k, *count), (7, 10, 20, 3, 1));
            }
            DatasetError::SizeMismatch {
                mask,
                mask_w,
                image_w,
                ..
            } => {
                assert_eq!(mask, &wrong_size);
                assert_eq!((*mask_w, *image_w), (256, 512));
            }
            DatasetError::Micrograph(e) => assert_eq!(e.path(), Some(unreadable.as_path())),
            other => panic!("unexpected problem: {other}"),
        }
        // Messages name the file, too.
        let name = p.path().unwrap().file_name().unwrap().to_string_lossy();
        assert!(p.to_string().contains(name.as_ref()), "{p}");
    }
    let err = Dataset::open(&copy, Some(&classes)).unwrap_err();
    assert!(err.to_string().contains("3 problem"), "{err}");
}

/// A tiny dataset written here, so this test runs on every machine.
#[test]
fn listing_problems_are_all_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    manifest(&["interior", "boundary"])
        .save(&dir.join("dataset.toml"))
        .unwrap();
    let img = GrayImage::from_pixel(4, 3, image::Luma([100]));
    let mask = GrayImage::from_fn(4, 3, |x, _| image::Luma([(x % 2) as u8]));
    // good pair, in two formats
    img.save(dir.join("images/good.tif")).unwrap();
    mask.save(dir.join("masks/good.png")).unwrap();
    // image without mask
    img.save(dir.join("images/lonely.png")).unwrap();
    // mask without image
    mask.save(dir.join("masks/orphan.png")).unwrap();
    // same stem twice among the images
    img.save(dir.join("images/twice.png")).unwrap();
    img.save(dir.join("images/twice.bmp")).unwrap();
    mask.save(dir.join("masks/twice.png")).unwrap();
    // 255 (ignore) is allowed, 2 is not with K = 2
    let mut m2 = mask.clone();
    m2.put_pixel(0, 0, image::Luma([255]));
    img.save(dir.join("images/ignored.png")).unwrap();
    m2.save(dir.join("masks/ignored.png")).unwrap();
    // not images: skipped, not problems
    std::fs::write(dir.join("images/notes.txt"), "x").unwrap();
    std::fs::write(dir.join("images/.DS_Store"), "x").unwrap();

    let report = Dataset::check(dir, None);
    let named = named_files(&report.problems);
    let expected: BTreeSet<String> = ["lonely.png", "orphan.png", "twice.png"]
        .map(String::from)
        .into();
    assert_eq!(named, expected, "{:?}", report.problems);
    assert_eq!(report.problems.len(), 3);
    assert!(matches!(
        report.problems.iter().find(|p| matches!(p, DatasetError::DuplicateStem { .. })),
        Some(DatasetError::DuplicateStem { first, .. }) if first.ends_with("twice.bmp")
    ));
    assert_eq!(report.skipped, vec![dir.join("images/notes.txt")]);
    assert_eq!(report.pairs.len(), 3); // good, ignored, twice (first of the two)
    // Ignore pixels are counted in their own bin, not in a class share.
    assert_eq!(report.class_pixels[255], 1);

    // Remove the listing problems: the dataset opens and serves its pairs.
    for f in ["images/lonely.png", "masks/orphan.png", "images/twice.png"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    let ds = Dataset::open(dir, None).unwrap();
    assert_eq!(ds.len(), 3);
    let loaded: Vec<_> = ds.iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(loaded.len(), 3);
    assert!(loaded.iter().all(|(i, m)| (i.width, m.width) == (4, 4)));

    // A mask that goes out of range after open is caught by load_pair.
    GrayImage::from_pixel(4, 3, image::Luma([2]))
        .save(dir.join("masks/good.png"))
        .unwrap();
    let i = ds.pairs().iter().position(|p| p.stem == "good").unwrap();
    let err = ds.load_pair(i).unwrap_err();
    assert!(
        matches!(
            err,
            DatasetError::ClassOutOfRange {
                value: 2,
                count: 12,
                ..
            }
        ),
        "{err}"
    );
}

/// A dataset folder whose lab left more pairs beside `images/` + `masks/` (side by side with a
/// suffix, and in a `val/` + `val_annot/` pair of folders): one problem that names them, since
/// training reads only the two folders; `dataset import` gathers them all.
#[test]
fn pairs_outside_images_and_masks_are_named_not_silently_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for d in ["images", "masks", "val", "val_annot"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    manifest(&["interior", "boundary"])
        .save(&dir.join("dataset.toml"))
        .unwrap();
    let img = GrayImage::from_pixel(4, 3, image::Luma([100]));
    let mask = GrayImage::from_fn(4, 3, |x, _| image::Luma([(x % 2) as u8]));
    img.save(dir.join("images/a.png")).unwrap();
    mask.save(dir.join("masks/a.png")).unwrap();
    let clean = Dataset::check(dir, None);
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);
    img.save(dir.join("b.tif")).unwrap();
    mask.save(dir.join("b_mask.png")).unwrap();
    img.save(dir.join("val/c.png")).unwrap();
    mask.save(dir.join("val_annot/c.png")).unwrap();
    // Another copy of a stem the layout pairs is not stray.
    img.save(dir.join("val/a.png")).unwrap();
    let report = Dataset::check(dir, None);
    assert_eq!(report.pairs.len(), 1);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert!(
        matches!(p, DatasetError::PairsOutsideLayout { count: 2, example, .. } if example.ends_with("b.tif")),
        "{p}"
    );
    assert!(p.to_string().contains("dataset import"), "{p}");
    assert!(Dataset::open(dir, None).is_err());
}

#[test]
fn missing_folder_and_bad_classes_file_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let report = Dataset::check(&tmp.path().join("nowhere"), None);
    assert!(matches!(
        report.problems.as_slice(),
        [DatasetError::NotADirectory { .. }]
    ));
    std::fs::create_dir_all(tmp.path().join("images")).unwrap();
    let bad = tmp.path().join("classes.toml");
    std::fs::write(&bad, "name = 'x'\nclasses = []\n").unwrap();
    let report = Dataset::check(tmp.path(), Some(&bad));
    let named = named_files(&report.problems);
    // bad classes file, missing masks/ folder
    assert!(named.contains("classes.toml"), "{named:?}");
    assert!(named.contains("masks"), "{named:?}");
}

/// `microfed dataset check` fails with a message that counts the problems.
#[test]
fn cli_check_counts_problems() {
    use microfed::cli::dataset::{Args, CheckArgs, DatasetCommand, run};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    manifest(&["a", "b"])
        .save(&dir.join("dataset.toml"))
        .unwrap();
    let img = GrayImage::new(2, 2);
    img.save(dir.join("images/x.png")).unwrap();
    img.save(dir.join("images/y.png")).unwrap();
    img.save(dir.join("masks/z.png")).unwrap();
    let args = |classes| Args {
        command: DatasetCommand::Check(CheckArgs {
            dir: dir.to_owned(),
            classes,
        }),
    };
    // x and y lack masks, z lacks an image.
    let err = run(args(None)).unwrap_err();
    assert!(err.to_string().starts_with("3 problem(s)"), "{err}");
    std::fs::remove_file(dir.join("images/y.png")).unwrap();
    std::fs::rename(dir.join("masks/z.png"), dir.join("masks/x.png")).unwrap();
    run(args(None)).unwrap();
}
