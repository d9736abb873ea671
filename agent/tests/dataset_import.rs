//! `dataset import` on the masks labs' tools write: RGB, RGBA (8 and 16 bits), palette PNGs, 16-bit
//! index masks, and a colour that matches no class; `dataset check` reads the same folders.

use std::path::Path;

use image::{GrayImage, ImageBuffer, Luma, Rgb, Rgba};
use microfed::dataset::Dataset;
use microfed::dataset::import::{ImportError, ImportOptions, import};
use microfed::mask::Mask;

const W: u32 = 16;
const H: u32 = 8;

/// Class of pixel (x, y) in every test mask: 0 left, 1 top right, 2 bottom right.
fn truth(x: u32, y: u32) -> u8 {
    if x < W / 2 {
        0
    } else if y < H / 2 {
        1
    } else {
        2
    }
}

const COLOURS: [[u8; 3]; 3] = [[0, 0, 0], [255, 0, 0], [0, 0, 255]];

fn classes_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("classes.toml");
    std::fs::write(
        &p,
        "name = \"lab\"\n\
         [[classes]]\nindex = 0\nname = \"matrix\"\ncolor = [0, 0, 0]\n\
         [[classes]]\nindex = 1\nname = \"oxide\"\ncolor = [255, 0, 0]\n\
         [[classes]]\nindex = 2\nname = \"crack\"\ncolor = [0, 0, 255]\n",
    )
    .unwrap();
    p
}

fn write_image(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    GrayImage::from_fn(W, H, |x, y| Luma([(x * 10 + y) as u8]))
        .save(path)
        .unwrap();
}

fn write_palette_png(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W, H);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    // Palette entries in another order than the classes: the colours decide, not the indices.
    enc.set_palette(vec![0, 0, 255, 0, 0, 0, 255, 0, 0]);
    let mut w = enc.write_header().unwrap();
    let to_entry = [1u8, 2, 0];
    let data: Vec<u8> = (0..H)
        .flat_map(|y| (0..W).map(move |x| to_entry[usize::from(truth(x, y))]))
        .collect();
    w.write_image_data(&data).unwrap();
}

fn assert_imported(out: &Path, stem: &str) {
    let mask = Mask::load(&out.join("masks").join(format!("{stem}.png"))).unwrap();
    for y in 0..H {
        for x in 0..W {
            assert_eq!(mask.get(x, y), truth(x, y), "{stem} at ({x}, {y})");
        }
    }
}

#[test]
fn rgb_rgba8_rgba16_palette_and_16_bit_masks_import_in_three_layouts() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("lab");
    // images/ + masks/: RGB with slightly-off colours (anti-aliasing, lossy re-save).
    write_image(&src.join("images/rgb.png"));
    std::fs::create_dir_all(src.join("masks")).unwrap();
    ImageBuffer::from_fn(W, H, |x, y| {
        let c = COLOURS[usize::from(truth(x, y))];
        Rgb([c[0].saturating_sub(5), c[1] + 3, c[2].saturating_sub(2)])
    })
    .save(src.join("masks/rgb.png"))
    .unwrap();
    // train/ + train_annot/: RGBA 8-bit and 16-bit.
    write_image(&src.join("train/rgba8.png"));
    write_image(&src.join("train/rgba16.png"));
    std::fs::create_dir_all(src.join("train_annot")).unwrap();
    ImageBuffer::from_fn(W, H, |x, y| {
        let c = COLOURS[usize::from(truth(x, y))];
        Rgba([c[0], c[1], c[2], 255])
    })
    .save(src.join("train_annot/rgba8.png"))
    .unwrap();
    ImageBuffer::from_fn(W, H, |x, y| {
        let c = COLOURS[usize::from(truth(x, y))].map(|v| u16::from(v) * 257);
        Rgba([c[0], c[1], c[2], 65535u16])
    })
    .save(src.join("train_annot/rgba16.png"))
    .unwrap();
    // Side by side with suffixes: a palette PNG and a 16-bit index mask.
    write_image(&src.join("side/pal.png"));
    write_palette_png(&src.join("side/pal_mask.png"));
    write_image(&src.join("side/idx16.png"));
    ImageBuffer::from_fn(W, H, |x, y| Luma([u16::from(truth(x, y))]))
        .save(src.join("side/idx16_label.png"))
        .unwrap();

    let classes = classes_file(t.path());
    // `dataset check` reads a lab's folder as it is: with images/ + masks/ (colour masks here) it
    // reads that layout, and names the four pairs beside it that training would not see.
    let report = Dataset::check(&src, Some(&classes));
    assert_eq!(report.pairs.len(), 1);
    assert!(
        matches!(
            report.problems.as_slice(),
            [microfed::dataset::DatasetError::PairsOutsideLayout { count: 4, .. }]
        ),
        "{:?}",
        report.problems
    );

    let out = t.path().join("out");
    let opts = ImportOptions {
        classes: Some(classes),
        ..ImportOptions::default()
    };
    let r = import(&src, &out, &opts).unwrap();
    assert_eq!(r.pairs.len(), 5);
    assert!(r.unmapped.is_empty());
    for stem in ["rgb", "rgba8", "rgba16", "pal", "idx16"] {
        assert_imported(&out, stem);
    }
    let ds = Dataset::open(&out, None).unwrap();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds.manifest.classes[2].name, "crack");
}

#[test]
fn an_unmapped_colour_is_reported_with_its_pixel_count() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("lab");
    write_image(&src.join("images/a.png"));
    std::fs::create_dir_all(src.join("masks")).unwrap();
    // Class 2 drawn in green, which no class has.
    ImageBuffer::from_fn(W, H, |x, y| match truth(x, y) {
        2 => Rgb([0u8, 200, 0]),
        c => Rgb(COLOURS[usize::from(c)]),
    })
    .save(src.join("masks/a.png"))
    .unwrap();
    let classes = classes_file(t.path());
    let opts = ImportOptions {
        classes: Some(classes.clone()),
        ..ImportOptions::default()
    };
    let green_px = u64::from(W / 2 * H / 2);
    match import(&src, &t.path().join("out"), &opts) {
        Err(ImportError::Unmapped { count, colours }) => {
            assert_eq!(count, 1);
            assert_eq!(colours, vec![([0, 200, 0], green_px)]);
        }
        other => panic!("expected Unmapped, got {other:?}"),
    }
    let problems = Dataset::check(&src, Some(&classes)).problems;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].to_string().contains("[0, 200, 0]"),
        "{}",
        problems[0]
    );

    // Asked to, the import writes them as ignore.
    let opts = ImportOptions {
        ignore_unmapped: true,
        ..opts
    };
    let r = import(&src, &t.path().join("out"), &opts).unwrap();
    assert_eq!(r.unmapped, vec![([0, 200, 0], green_px)]);
    let mask = Mask::load(&t.path().join("out/masks/a.png")).unwrap();
    assert_eq!(mask.get(W - 1, H - 1), 255);
}

#[test]
fn without_a_classes_file_the_classes_come_from_the_colours() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("lab");
    write_image(&src.join("images/a.png"));
    std::fs::create_dir_all(src.join("masks")).unwrap();
    ImageBuffer::from_fn(W, H, |x, y| Rgb(COLOURS[usize::from(truth(x, y))]))
        .save(src.join("masks/a.png"))
        .unwrap();
    let r = import(&src, &t.path().join("out"), &ImportOptions::default()).unwrap();
    assert!(r.classes_inferred);
    // Most frequent first: black (half the image), then the two quarters by colour order.
    let colours: Vec<[u8; 3]> = r.manifest.classes.iter().map(|c| c.color).collect();
    assert_eq!(colours, vec![[0, 0, 0], [0, 0, 255], [255, 0, 0]]);
    Dataset::open(&t.path().join("out"), None).unwrap();
}
