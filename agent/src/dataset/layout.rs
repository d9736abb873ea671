//! Finding the image/mask pairs of a folder laid out the way a lab's tools left it.
//!
//! A file is a mask when a folder on its path is a mask folder (`masks/`, `labels/`, `annotations/`,
//! `gt/`, `SegmentationClass/`, or a name ending in one of those words, like CamVid's `train_annot/`
//! or `trainannot/`), or when its stem ends in a mask suffix (`_mask`, `-mask`, `.mask` as `segment`
//! writes, `_label(s)`, `_annot`, `_gt`, `_seg`, CamVid's `_L`). Every other image file is a
//! micrograph. Both are keyed by the stem without the suffix and paired by key, wherever they sit
//! under the folder (four levels deep at most), so `images/` + `masks/`, `train/` + `train_annot/`
//! and `a.tif` + `a_mask.png` side by side are all found.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Extensions (lower case) of the files a dataset may hold.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "tif", "tiff", "jpg", "jpeg", "bmp"];

/// One image and its mask, matched by file stem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub stem: String,
    pub image: PathBuf,
    pub mask: PathBuf,
}

/// What [`find`] saw.
#[derive(Debug, Default)]
pub struct Found {
    /// Pairs in key order.
    pub pairs: Vec<Pair>,
    pub images_without_mask: Vec<PathBuf>,
    pub masks_without_image: Vec<PathBuf>,
    /// Two images (or two masks) with one key: (first, second).
    pub duplicates: Vec<(PathBuf, PathBuf)>,
    /// Files that are not images, by extension.
    pub skipped: Vec<PathBuf>,
}

const MASK_FOLDER_WORDS: [&str; 11] = [
    "mask",
    "masks",
    "label",
    "labels",
    "annot",
    "annots",
    "annotation",
    "annotations",
    "gt",
    "groundtruth",
    "segmentationclass",
];

const MASK_SUFFIXES: [&str; 14] = [
    "_mask",
    "-mask",
    ".mask",
    "_masks",
    "_label",
    "-label",
    "_labels",
    "_annot",
    "_anno",
    "_gt",
    "_seg",
    "-seg",
    "_segmentation",
    "_L",
];

/// Is a folder of this name a folder of masks?
pub fn is_mask_folder(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase();
    MASK_FOLDER_WORDS.iter().any(|w| n.ends_with(w)) && !n.ends_with("images")
}

/// The stem without its mask suffix, if it has one.
pub fn strip_mask_suffix(stem: &str) -> Option<&str> {
    MASK_SUFFIXES.iter().find_map(|s| {
        // `_L` is case-sensitive (CamVid); the others are not.
        let cut = stem.len().checked_sub(s.len())?;
        let (head, tail) = stem.split_at_checked(cut)?;
        let hit = if *s == "_L" {
            tail == *s
        } else {
            tail.eq_ignore_ascii_case(s)
        };
        (hit && !head.is_empty()).then_some(head)
    })
}

/// Lists the pairs under `dir` (see the module docs).
pub fn find(dir: &Path) -> std::io::Result<Found> {
    let mut files = Vec::new();
    walk(dir, 0, &mut files)?;
    files.sort();
    let mut found = Found::default();
    let mut images: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut masks: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in files {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            found.skipped.push(path);
            continue;
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let in_mask_folder = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .parent()
            .is_some_and(|p| p.iter().any(|c| is_mask_folder(&c.to_string_lossy())));
        let (key, is_mask) = match strip_mask_suffix(&stem) {
            Some(key) => (key.to_owned(), true),
            None => (stem.clone(), in_mask_folder),
        };
        let map = if is_mask { &mut masks } else { &mut images };
        if let Some(first) = map.get(&key) {
            found.duplicates.push((first.clone(), path));
        } else {
            map.insert(key, path);
        }
    }
    for (key, image) in &images {
        match masks.get(key) {
            Some(mask) => found.pairs.push(Pair {
                stem: key.clone(),
                image: image.clone(),
                mask: mask.clone(),
            }),
            None => found.images_without_mask.push(image.clone()),
        }
    }
    found.masks_without_image = masks
        .iter()
        .filter(|(k, _)| !images.contains_key(*k))
        .map(|(_, p)| p.clone())
        .collect();
    Ok(found)
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .is_none_or(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            if depth < 4 {
                walk(&path, depth + 1, out)?;
            }
        } else if path.file_name().is_some_and(|n| n != "dataset.toml") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_folders_and_suffixes() {
        for f in [
            "masks",
            "labels",
            "train_annot",
            "trainannot",
            "SegmentationClass",
            "GT",
        ] {
            assert!(is_mask_folder(f), "{f}");
        }
        for f in ["images", "train", "val", "img"] {
            assert!(!is_mask_folder(f), "{f}");
        }
        assert_eq!(strip_mask_suffix("a_mask"), Some("a"));
        assert_eq!(strip_mask_suffix("a.mask"), Some("a"));
        assert_eq!(strip_mask_suffix("0001TP_L"), Some("0001TP"));
        assert_eq!(strip_mask_suffix("0001TP_l"), None);
        assert_eq!(strip_mask_suffix("a_Label"), Some("a"));
        assert_eq!(strip_mask_suffix("_mask"), None);
        assert_eq!(strip_mask_suffix("plain"), None);
    }

    #[test]
    fn finds_pairs_in_the_common_layouts() {
        let t = tempfile::tempdir().unwrap();
        let touch = |rel: &str| {
            let p = t.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        };
        touch("train/a.png");
        touch("train_annot/a.png");
        touch("side/b.tif");
        touch("side/b_mask.png");
        touch("images/c.png");
        touch("masks/c_label.png");
        touch("images/lonely.png");
        touch("notes.txt");
        let f = find(t.path()).unwrap();
        let stems: Vec<&str> = f.pairs.iter().map(|p| p.stem.as_str()).collect();
        assert_eq!(stems, ["a", "b", "c"]);
        assert_eq!(f.images_without_mask.len(), 1);
        assert_eq!(f.skipped.len(), 1);
        assert!(f.duplicates.is_empty());
    }
}
