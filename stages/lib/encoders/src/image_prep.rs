//! Image preprocessing as torchvision does it on PIL images: decode, RGB, resize with
//! PIL's bilinear filter (antialiased: the filter widens when downscaling), `ToTensor`
//! and ImageNet normalisation.
//!
//! The resize reproduces PIL's `ImagingResample` for 8-bit images: separable passes
//! (horizontal, then vertical), coefficients in fixed point with 22 fractional bits,
//! each pass rounded and clipped to `u8`.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use candle_core::{Device, Tensor};

/// ImageNet per-channel mean (torchvision).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet per-channel standard deviation (torchvision).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's `precompute_coeffs` for the bilinear (triangle) filter: per output pixel, the first
/// input index and the fixed-point weights.
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 1.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut k: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) * ss).abs();
                    if t < 1.0 { 1.0 - t } else { 0.0 }
                })
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            let fixed = k
                .iter()
                .map(|v| {
                    let s = v * (1u64 << PRECISION_BITS) as f64;
                    (if s < 0.0 { s - 0.5 } else { s + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

#[inline]
fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes interleaved RGB8 `src` (w x h) to (ow x oh) as PIL's `Image.resize(..., BILINEAR)`.
pub fn resize_bilinear_pil(src: &[u8], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass.
    let tmp: Vec<u8> = if ow == w {
        src.to_vec()
    } else {
        let cx = coeffs(w, ow);
        let mut t = vec![0u8; ow * h * 3];
        for y in 0..h {
            for (x, (xmin, k)) in cx.iter().enumerate() {
                for c in 0..3 {
                    let mut acc = half;
                    for (i, kv) in k.iter().enumerate() {
                        acc += i64::from(src[(y * w + xmin + i) * 3 + c]) * i64::from(*kv);
                    }
                    t[(y * ow + x) * 3 + c] = clip8(acc);
                }
            }
        }
        t
    };
    if oh == h {
        return tmp;
    }
    let cy = coeffs(h, oh);
    let mut out = vec![0u8; ow * oh * 3];
    for (y, (ymin, k)) in cy.iter().enumerate() {
        for x in 0..ow {
            for c in 0..3 {
                let mut acc = half;
                for (i, kv) in k.iter().enumerate() {
                    acc += i64::from(tmp[((ymin + i) * ow + x) * 3 + c]) * i64::from(*kv);
                }
                out[(y * ow + x) * 3 + c] = clip8(acc);
            }
        }
    }
    out
}

/// The largest image side decoded, in pixels: a bigger image (a decompression bomb: a
/// small file that decodes to gigabytes) is refused from its header, before decoding.
pub const MAX_SIDE: u32 = 8192;
/// The most memory one decode may allocate.
pub const MAX_DECODE_BYTES: u64 = 256 << 20;

/// Decodes an image file to RGB8 (width, height, pixels); refuses images larger than
/// [`MAX_SIDE`] on a side or needing more than [`MAX_DECODE_BYTES`].
pub fn decode_rgb(path: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let mut reader = image::ImageReader::open(path)
        .with_context(|| format!("opening image {}", path.display()))?
        .with_guessed_format()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let img = match reader.decode() {
        Ok(i) => i,
        Err(image::ImageError::Limits(e)) => {
            bail!(
                "image {} is larger than huse-run decodes (at most {MAX_SIDE} x {MAX_SIDE} pixels, {} MiB): {e}",
                path.display(),
                MAX_DECODE_BYTES >> 20
            )
        }
        Err(e) => return Err(e).with_context(|| format!("decoding image {}", path.display())),
    }
    .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok((w, h, img.into_raw()))
}

/// Writes the normalised CHW floats of one RGB8 image of size (w, h) into `out` (3*h*w).
pub fn normalise_into(rgb: &[u8], w: usize, h: usize, out: &mut [f32]) {
    let hw = w * h;
    for p in 0..hw {
        for c in 0..3 {
            out[c * hw + p] = (f32::from(rgb[p * 3 + c]) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
}

/// Writes the normalised CHW floats of one RGB image of floats in `[0, 1]` (`HWC`, as
/// [`crate::augment`] works on) into `out` (3*h*w); for `x = v / 255` it equals
/// [`normalise_into`] of `v`.
pub fn normalise_f32_into(hwc: &[f32], w: usize, h: usize, out: &mut [f32]) {
    let hw = w * h;
    for p in 0..hw {
        for c in 0..3 {
            out[c * hw + p] = (hwc[p * 3 + c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
}

/// File -> RGB8 pixels resized to (size, size) like PIL (`Resize((size, size))`).
pub fn load_resized(path: &Path, size: usize) -> Result<Vec<u8>> {
    let (w, h, rgb) = decode_rgb(path)?;
    Ok(resize_bilinear_pil(&rgb, w, h, size, size))
}

/// Resized RGB8 pixels -> normalised (3, size, size) floats (`ToTensor -> Normalize`).
pub fn normalised(resized: &[u8], size: usize) -> Vec<f32> {
    let mut out = vec![0f32; 3 * size * size];
    normalise_into(resized, size, size, &mut out);
    out
}

/// File -> normalised (3, size, size) floats, as torchvision's
/// `Resize((size, size)) -> ToTensor -> Normalize(ImageNet)` on a PIL RGB image.
pub fn preprocess_file(path: &Path, size: usize) -> Result<Vec<f32>> {
    Ok(normalised(&load_resized(path, size)?, size))
}

/// Stacks preprocessed images into a (B, 3, size, size) tensor.
pub fn batch(images: &[Vec<f32>], size: usize, device: &Device) -> Result<Tensor> {
    let flat: Vec<f32> = images.iter().flat_map(|v| v.iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (images.len(), 3, size, size), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_resize_is_exact_and_upscale_interpolates() {
        let src: Vec<u8> = (0..4 * 2 * 3).map(|i| (i * 10) as u8).collect();
        assert_eq!(resize_bilinear_pil(&src, 4, 2, 4, 2), src);
        // 1-D check: [0, 100] upscaled to 4 px gives PIL's [0, 25, 75, 100].
        let src = [0u8, 0, 0, 100, 100, 100];
        let out = resize_bilinear_pil(&src, 2, 1, 4, 1);
        let r: Vec<u8> = out.chunks(3).map(|p| p[0]).collect();
        assert_eq!(r, [0, 25, 75, 100]);
    }

    #[test]
    fn downscale_is_antialiased() {
        // 4 px -> 2 px averages neighbours (support widens with the scale).
        let src: Vec<u8> = [0u8, 100, 200, 255].iter().flat_map(|v| [*v, *v, *v]).collect();
        let out = resize_bilinear_pil(&src, 4, 1, 2, 1);
        let r: Vec<u8> = out.chunks(3).map(|p| p[0]).collect();
        // By hand, PIL's formula: centre 1.0, support 2 -> inputs 0..3 with triangle weights
        // (0.75, 0.75, 0.25)/1.75 -> 71.4; centre 3.0 -> inputs 1..4, (0.25, 0.75, 0.75)/1.75 -> 209.3.
        assert_eq!(r, [71, 209]);
    }
}
