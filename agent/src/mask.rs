//! A segmentation mask: one class index per pixel, stored as an 8-bit grayscale PNG whose pixel values are
//! the indices (not colours). Colour overlays for people are made from it with the class colours.

pub mod labels;

use std::path::{Path, PathBuf};

use image::{GrayImage, ImageReader, Rgb, RgbImage};

use crate::classes::ClassDef;

/// Class index per pixel, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Errors reading or writing a mask; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("{path}: cannot read mask: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: mask must be single-channel 8-bit (class indices), found {found}")]
    NotIndexed { path: PathBuf, found: String },
    #[error("{path}: cannot write mask: {message}")]
    Write { path: PathBuf, message: String },
}

impl Mask {
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Self {
        assert_eq!(
            data.len(),
            width as usize * height as usize,
            "mask data does not match its size"
        );
        Self {
            width,
            height,
            data,
        }
    }

    pub fn filled(width: u32, height: u32, class: u8) -> Self {
        Self {
            width,
            height,
            data: vec![class; width as usize * height as usize],
        }
    }

    #[inline]
    pub fn get(&self, x: u32, y: u32) -> u8 {
        self.data[y as usize * self.width as usize + x as usize]
    }

    /// Reads a class-index image (PNG, TIFF, BMP; 8-bit single channel). An RGB image whose three
    /// channels are equal is accepted too (some tools save gray as RGB); a colour image is refused, since
    /// colours are not class indices.
    pub fn load(path: &Path) -> Result<Self, MaskError> {
        let read_err = |message: String| MaskError::Read {
            path: path.to_owned(),
            message,
        };
        let img = ImageReader::open(path)
            .map_err(|e| read_err(e.to_string()))?
            .with_guessed_format()
            .map_err(|e| read_err(e.to_string()))?
            .decode()
            .map_err(|e| read_err(e.to_string()))?;
        let (width, height) = (img.width(), img.height());
        let data = match img {
            image::DynamicImage::ImageLuma8(g) => g.into_raw(),
            image::DynamicImage::ImageRgb8(rgb) => {
                let mut out = Vec::with_capacity(width as usize * height as usize);
                for p in rgb.pixels() {
                    if p[0] != p[1] || p[1] != p[2] {
                        return Err(MaskError::NotIndexed {
                            path: path.to_owned(),
                            found: "a colour RGB image".into(),
                        });
                    }
                    out.push(p[0]);
                }
                out
            }
            other => {
                return Err(MaskError::NotIndexed {
                    path: path.to_owned(),
                    found: format!("{:?}", other.color()),
                });
            }
        };
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// Writes the mask as an 8-bit grayscale PNG of class indices.
    pub fn save_png(&self, path: &Path) -> Result<(), MaskError> {
        let img =
            GrayImage::from_raw(self.width, self.height, self.data.clone()).ok_or_else(|| {
                MaskError::Write {
                    path: path.to_owned(),
                    message: "size does not match data".into(),
                }
            })?;
        img.save_with_format(path, image::ImageFormat::Png)
            .map_err(|e| MaskError::Write {
                path: path.to_owned(),
                message: e.to_string(),
            })
    }

    /// Colours each pixel with its class colour; unknown indices are magenta so they stand out.
    pub fn to_color(&self, classes: &[ClassDef]) -> RgbImage {
        RgbImage::from_fn(self.width, self.height, |x, y| {
            let c = self.get(x, y) as usize;
            Rgb(classes.get(c).map(|d| d.color).unwrap_or([255, 0, 255]))
        })
    }

    /// Histogram of class indices (256 bins).
    pub fn histogram(&self) -> [u64; 256] {
        let mut h = [0u64; 256];
        for &v in &self.data {
            h[v as usize] += 1;
        }
        h
    }
}
