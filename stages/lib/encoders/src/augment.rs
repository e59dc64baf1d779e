//! Image augmentation as torchvision defines it: `ColorJitter` (brightness, contrast,
//! saturation, hue, applied in a random order with factors drawn per image) and
//! `RandomHorizontalFlip`, on an RGB image of floats in `[0, 1]` laid out row by row
//! (`HWC`), i.e. after the resize and before the normalisation of [`crate::image_prep`].
//!
//! The operations follow torchvision's tensor functionals (`_blend`, `rgb_to_grayscale`
//! with weights 0.2989/0.587/0.114, `_rgb2hsv`/`_hsv2rgb`); the random draws use our own
//! seeded generator, so a view is reproducible from its seed, not equal to torch's stream.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Jitter strengths, as `ColorJitter(brightness, contrast, saturation, hue)` takes them,
/// and the horizontal flip probability.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Jitter {
    /// Factor drawn from `[max(0, 1 - b), 1 + b]`; 0 leaves brightness alone.
    #[serde(default)]
    pub brightness: f32,
    /// Factor drawn from `[max(0, 1 - c), 1 + c]`.
    #[serde(default)]
    pub contrast: f32,
    /// Factor drawn from `[max(0, 1 - s), 1 + s]`.
    #[serde(default)]
    pub saturation: f32,
    /// Hue shift drawn from `[-h, h]`, `h <= 0.5`.
    #[serde(default)]
    pub hue: f32,
    /// Probability of a horizontal flip (torchvision's default is 0.5).
    #[serde(default)]
    pub hflip: f32,
}

/// The draws for one view: which adjustments, their factors, their order, and the flip.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewParams {
    /// The four adjustments (0 brightness, 1 contrast, 2 saturation, 3 hue) in the order applied.
    pub order: [usize; 4],
    /// Brightness factor, if jittered.
    pub brightness: Option<f32>,
    /// Contrast factor.
    pub contrast: Option<f32>,
    /// Saturation factor.
    pub saturation: Option<f32>,
    /// Hue shift.
    pub hue: Option<f32>,
    /// Flip horizontally.
    pub flip: bool,
}

impl Jitter {
    /// Checks the strengths; `Err((key, message))`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for (k, v) in [("brightness", self.brightness), ("contrast", self.contrast), ("saturation", self.saturation)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err((k, format!("expected a number >= 0, found {v}")));
            }
        }
        if !(self.hue.is_finite() && (0.0..=0.5).contains(&self.hue)) {
            return Err(("hue", format!("expected 0 to 0.5, found {}", self.hue)));
        }
        if !(self.hflip.is_finite() && (0.0..=1.0).contains(&self.hflip)) {
            return Err(("hflip", format!("expected a probability 0 to 1, found {}", self.hflip)));
        }
        Ok(())
    }

    /// Draws one view's parameters (torchvision's `ColorJitter.get_params` + the flip coin).
    pub fn sample(&self, rng: &mut impl Rng) -> ViewParams {
        let mut order = [0, 1, 2, 3];
        order.shuffle(rng);
        let mut factor = |s: f32| (s > 0.0).then(|| rng.random_range((1.0 - s).max(0.0)..=1.0 + s));
        let brightness = factor(self.brightness);
        let contrast = factor(self.contrast);
        let saturation = factor(self.saturation);
        let hue = (self.hue > 0.0).then(|| rng.random_range(-self.hue..=self.hue));
        let flip = self.hflip > 0.0 && rng.random::<f32>() < self.hflip;
        ViewParams { order, brightness, contrast, saturation, hue, flip }
    }
}

fn gray(p: &[f32]) -> f32 {
    0.2989 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

/// `ratio * a + (1 - ratio) * b`, clamped to `[0, 1]` (torchvision's `_blend` for floats).
fn blend(a: f32, b: f32, ratio: f32) -> f32 {
    (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)
}

/// `adjust_brightness`: blend with black.
pub fn brightness(img: &mut [f32], f: f32) {
    img.iter_mut().for_each(|v| *v = blend(*v, 0.0, f));
}

/// `adjust_contrast`: blend with the mean grey level of the whole image.
pub fn contrast(img: &mut [f32], f: f32) {
    let n = img.len() / 3;
    let mean = img.chunks_exact(3).map(gray).sum::<f32>() / n.max(1) as f32;
    img.iter_mut().for_each(|v| *v = blend(*v, mean, f));
}

/// `adjust_saturation`: blend each pixel with its grey level.
pub fn saturation(img: &mut [f32], f: f32) {
    for p in img.chunks_exact_mut(3) {
        let g = gray(p);
        p.iter_mut().for_each(|v| *v = blend(*v, g, f));
    }
}

/// torchvision's `_rgb2hsv` for one pixel.
fn rgb2hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let div = if eqc { 1.0 } else { cr };
    let (rc, gc, bc) = ((maxc - r) / div, (maxc - g) / div, (maxc - b) / div);
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    ((h / 6.0 + 1.0).rem_euclid(1.0), s, maxc)
}

/// torchvision's `_hsv2rgb` for one pixel.
fn hsv2rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let i = (i as i64).rem_euclid(6);
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match i {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// `adjust_hue`: rotate the hue by `shift` (a fraction of the circle, -0.5 to 0.5).
pub fn hue(img: &mut [f32], shift: f32) {
    for p in img.chunks_exact_mut(3) {
        let (h, s, v) = rgb2hsv(p[0], p[1], p[2]);
        let (r, g, b) = hsv2rgb((h + shift).rem_euclid(1.0), s, v);
        p[0] = r;
        p[1] = g;
        p[2] = b;
    }
}

/// `hflip` of a `w`-pixel-wide image.
pub fn hflip(img: &mut [f32], w: usize) {
    for row in img.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
            }
        }
    }
}

/// The generator of view `k` of the item `id` under `seed`: a view depends on these three
/// only (not on batch sizes, thread counts or which other items are encoded).
pub fn view_rng(seed: u64, id: &str, k: usize) -> ChaCha8Rng {
    // FNV-1a of the id, mixed with the seed and view number (splitmix64 finaliser).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

/// One view of a resized RGB8 image (`size` x `size`): `ToTensor`, the view's jitter and
/// flip, then the ImageNet normalisation, as normalised `(3, size, size)` floats.
pub fn view_of(resized: &[u8], size: usize, p: &ViewParams) -> Vec<f32> {
    let mut img: Vec<f32> = resized.iter().map(|v| f32::from(*v) / 255.0).collect();
    apply(&mut img, size, p);
    let mut out = vec![0f32; img.len()];
    crate::image_prep::normalise_f32_into(&img, size, size, &mut out);
    out
}

/// Applies a view's jitter (in its order) and flip to an image `w` pixels wide.
pub fn apply(img: &mut [f32], w: usize, p: &ViewParams) {
    for op in p.order {
        match op {
            0 => p.brightness.inspect(|f| brightness(img, *f)),
            1 => p.contrast.inspect(|f| contrast(img, *f)),
            2 => p.saturation.inspect(|f| saturation(img, *f)),
            _ => p.hue.inspect(|f| hue(img, *f)),
        };
    }
    if p.flip {
        hflip(img, w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    // Every expected value below is worked out by hand from torchvision's definitions.

    #[test]
    fn brightness_scales_and_clamps() {
        let mut img = vec![0.2, 0.4, 0.8];
        brightness(&mut img, 1.5);
        close(&img, &[0.3, 0.6, 1.0]); // 1.2 clamps to 1
    }

    #[test]
    fn contrast_blends_with_the_mean_grey_of_the_image() {
        // Black and white: grey levels 0 and 0.9999, mean 0.49995.
        let mut img = vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        contrast(&mut img, 0.5);
        close(&img, &[0.249975, 0.249975, 0.249975, 0.749975, 0.749975, 0.749975]);
    }

    #[test]
    fn saturation_blends_with_each_pixels_grey() {
        let mut red = vec![1.0, 0.0, 0.0];
        saturation(&mut red, 0.0);
        close(&red, &[0.2989, 0.2989, 0.2989]);
        // (0.5, 0.25, 0.25): grey = 0.14945 + 0.14675 + 0.0285 = 0.3247; 2x - grey.
        let mut p = vec![0.5, 0.25, 0.25];
        saturation(&mut p, 2.0);
        close(&p, &[0.6753, 0.1753, 0.1753]);
    }

    #[test]
    fn hue_rotates_around_the_colour_circle() {
        let mut red = vec![1.0, 0.0, 0.0];
        hue(&mut red, 1.0 / 3.0);
        close(&red, &[0.0, 1.0, 0.0]);
        // Orange (1, 0.5, 0): h = 1/12; + 0.5 = 7/12 -> sector 3, f = 0.5 -> (0, 0.5, 1), azure.
        let mut orange = vec![1.0, 0.5, 0.0];
        hue(&mut orange, 0.5);
        close(&orange, &[0.0, 0.5, 1.0]);
        // Greys have no hue: unchanged.
        let mut g = vec![0.3, 0.3, 0.3];
        hue(&mut g, 0.25);
        close(&g, &[0.3, 0.3, 0.3]);
        // A full turn in two half turns is the identity.
        let mut p = vec![0.9, 0.2, 0.4];
        hue(&mut p, 0.5);
        hue(&mut p, -0.5);
        close(&p, &[0.9, 0.2, 0.4]);
    }

    #[test]
    fn hflip_mirrors_each_row() {
        let mut img: Vec<f32> = (0..12).map(|v| v as f32).collect(); // 2 rows of 2 pixels
        hflip(&mut img, 2);
        assert_eq!(img, [3.0, 4.0, 5.0, 0.0, 1.0, 2.0, 9.0, 10.0, 11.0, 6.0, 7.0, 8.0]);
    }

    #[test]
    fn draws_stay_in_range_and_repeat_with_the_seed() {
        let j = Jitter { brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1, hflip: 0.5 };
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let views: Vec<ViewParams> = (0..200).map(|_| j.sample(&mut rng)).collect();
        for v in &views {
            for f in [v.brightness, v.contrast, v.saturation] {
                assert!((0.6..=1.4).contains(&f.unwrap()));
            }
            assert!((-0.1..=0.1).contains(&v.hue.unwrap()));
            let mut o = v.order;
            o.sort();
            assert_eq!(o, [0, 1, 2, 3]);
        }
        let flips = views.iter().filter(|v| v.flip).count();
        assert!((70..=130).contains(&flips), "{flips} flips of 200");
        let mut again = ChaCha8Rng::seed_from_u64(7);
        assert_eq!(j.sample(&mut again), views[0]);
        // Strength 0 leaves an adjustment out; bad strengths are refused by key.
        let none = Jitter::default().sample(&mut rng);
        assert!(none.brightness.is_none() && none.hue.is_none() && !none.flip);
        assert_eq!(Jitter { hue: 0.6, ..Default::default() }.check().unwrap_err().0, "hue");
        assert_eq!(Jitter { contrast: -1.0, ..Default::default() }.check().unwrap_err().0, "contrast");
    }

    #[test]
    fn views_depend_on_seed_item_and_number_only_and_the_identity_view_is_the_clean_image() {
        let j = Jitter { brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1, hflip: 0.5 };
        let draw = |seed, id, k| j.sample(&mut view_rng(seed, id, k));
        assert_eq!(draw(1, "15970", 0), draw(1, "15970", 0));
        assert_ne!(draw(1, "15970", 0), draw(1, "15970", 1));
        assert_ne!(draw(1, "15970", 0), draw(2, "15970", 0));
        assert_ne!(draw(1, "15970", 0), draw(1, "15971", 0));
        // No jitter and no flip: the view is the clean preprocessing, bit for bit.
        let rgb: Vec<u8> = (0..4 * 4 * 3).map(|v| (v * 5) as u8).collect();
        let none = Jitter::default().sample(&mut view_rng(0, "x", 0));
        assert_eq!(view_of(&rgb, 4, &none), crate::image_prep::normalised(&rgb, 4));
        // Flip only: the clean preprocessing of the mirrored pixels.
        let flip = ViewParams { flip: true, ..none };
        let mut mirrored = rgb.clone();
        for row in mirrored.chunks_exact_mut(12) {
            let px: Vec<[u8; 3]> = row.chunks(3).rev().map(|p| [p[0], p[1], p[2]]).collect();
            row.copy_from_slice(&px.concat());
        }
        assert_eq!(view_of(&rgb, 4, &flip), crate::image_prep::normalised(&mirrored, 4));
    }

    #[test]
    fn apply_runs_the_drawn_order() {
        // Brightness 2 then saturation 0 differs from saturation 0 then brightness 2 only
        // through clamping: (0.8, 0.2, 0.1).
        let p = |order| ViewParams {
            order,
            brightness: Some(2.0),
            contrast: None,
            saturation: Some(0.0),
            hue: None,
            flip: false,
        };
        let mut a = vec![0.8, 0.2, 0.1];
        apply(&mut a, 1, &p([0, 2, 1, 3]));
        // (1.0, 0.4, 0.2) -> grey 0.2989 + 0.2348 + 0.0228 = 0.5565
        close(&a, &[0.5565, 0.5565, 0.5565]);
        let mut b = vec![0.8, 0.2, 0.1];
        apply(&mut b, 1, &p([2, 0, 1, 3]));
        // grey 0.23912 + 0.1174 + 0.0114 = 0.36792, doubled 0.73584
        close(&b, &[0.73584, 0.73584, 0.73584]);
    }
}
