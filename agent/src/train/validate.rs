//! Scoring the network on whole validation micrographs (not crops), with [`crate::metrics::Evaluator`].
//!
//! An image whose sides are not multiples of 16 is padded on the right and bottom by reflection to the
//! next multiple, and the prediction is cropped back: every real pixel is predicted once, with the same
//! kind of context it has in training. Each distinct image size gets its own activation buffers in the
//! U-Net (it keeps a few shapes), so validation sets of one image size cost one allocation.

use microfed_kernels::unet::{SIZE_MULTIPLE, UNet};
use microfed_kernels::{Backend, Shape};

use super::TrainError;
use super::data::TrainingImage;
use crate::augment::reflect;
use crate::mask::Mask;
use crate::metrics::{Evaluation, Evaluator};

/// Boundary-F1 tolerance used for validation, in pixels.
pub const BOUNDARY_TOLERANCE_PX: f64 = 2.0;

/// Predicted class per pixel of one whole image.
/// `backend` must be the network's own (the logits are read back through it).
pub fn predict<B: Backend>(
    backend: &B,
    net: &mut UNet<B>,
    image: &TrainingImage,
) -> Result<Mask, TrainError> {
    let (w, h) = (image.width, image.height);
    let pw = w.div_ceil(SIZE_MULTIPLE) * SIZE_MULTIPLE;
    let ph = h.div_ceil(SIZE_MULTIPLE) * SIZE_MULTIPLE;
    let mut x = vec![0.0f32; pw * ph];
    for y in 0..ph {
        let sy = reflect(y as isize, h);
        for xx in 0..pw {
            x[y * pw + xx] = image.pixels[sy * w + reflect(xx as isize, w)];
        }
    }
    let buf = backend.upload(&x)?;
    let xs = Shape::new(1, 1, ph, pw);
    let logits = backend.download(net.forward(&buf, xs)?)?;
    let labels = argmax_crop(&logits, net.classes(), pw, ph, w, h);
    Ok(Mask::new(w as u32, h as u32, labels))
}

/// Class of highest logit per pixel of the top-left `w × h` corner of `[k, ph, pw]` logits (the image
/// before its padding to a multiple of 16), row-major.
pub fn argmax_crop(logits: &[f32], k: usize, pw: usize, ph: usize, w: usize, h: usize) -> Vec<u8> {
    let plane = pw * ph;
    let mut labels = vec![0u8; w * h];
    for y in 0..h {
        for xx in 0..w {
            let at = y * pw + xx;
            let mut best = 0;
            for c in 1..k {
                if logits[c * plane + at] > logits[best * plane + at] {
                    best = c;
                }
            }
            labels[y * w + xx] = best as u8;
        }
    }
    labels
}

/// Per-class IoU, mean IoU and boundary F1 over `images`.
pub fn evaluate<B: Backend>(
    backend: &B,
    net: &mut UNet<B>,
    images: &[TrainingImage],
    class_names: &[String],
) -> Result<Evaluation, TrainError> {
    let mut ev = Evaluator::new(net.classes(), BOUNDARY_TOLERANCE_PX)?;
    for img in images {
        let pred = predict(backend, net, img)?;
        let truth = Mask::new(img.width as u32, img.height as u32, img.labels.clone());
        ev.add(&img.stem, &truth, &pred)?;
    }
    Ok(ev.finish(class_names))
}
