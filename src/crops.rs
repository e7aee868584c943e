//! Attention crops (METHOD step 1.2): the regions of a top image where the neuron fires.
//!
//! The neuron's map is min-max scaled to 8 bits (the reference's plain `x255` cast wraps
//! around above 1; an intended deviation), resized to the image with PIL's bicubic filter,
//! binarised at Otsu's threshold; the bounding rectangles of the external contours, largest
//! first, are kept while each overlaps every kept box by IoU <= 0.5 and the whole image by
//! IoU < 0.8. Everything happens at the original image resolution.

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::probe::{resize_like_pil, Interpolation, PassOrder};

/// A crop box in original image pixels, `[x0, y0, x1, y1)` (OpenCV's `x, y, x + w, y + h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl CropBox {
    pub fn area(&self) -> u64 {
        u64::from(self.x1 - self.x0) * u64::from(self.y1 - self.y0)
    }

    pub fn iou(&self, other: &CropBox) -> f64 {
        let ox = self.x1.min(other.x1).saturating_sub(self.x0.max(other.x0));
        let oy = self.y1.min(other.y1).saturating_sub(self.y0.max(other.y0));
        let inter = u64::from(ox) * u64::from(oy);
        let union = self.area() + other.area() - inter;
        if union == 0 {
            0.0
        } else {
            inter as f64 / union as f64
        }
    }

    pub fn as_array(&self) -> [u32; 4] {
        [self.x0, self.y0, self.x1, self.y1]
    }
}

/// The parameters of step 1.2.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct CropRules {
    /// At most this many boxes per image (reference: 4).
    pub max_crops: usize,
    /// A box is dropped when its IoU with a kept box exceeds this (reference: 0.5).
    pub max_overlap: f64,
    /// A box is dropped when its IoU with the whole image reaches this (reference: 0.8).
    pub max_whole_image: f64,
}

impl Default for CropRules {
    fn default() -> Self {
        Self {
            max_crops: 4,
            max_overlap: 0.5,
            max_whole_image: 0.8,
        }
    }
}

/// The neuron map (`map_w x map_h`, row-major) as an 8-bit heat map of `width x height`.
pub fn heatmap(map: &[f32], (map_w, map_h): (u32, u32), (width, height): (u32, u32)) -> GrayImage {
    assert_eq!(map.len(), (map_w * map_h) as usize, "map size");
    let (lo, hi) = map
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let span = hi - lo;
    let bytes: Vec<u8> = map
        .iter()
        .map(|&v| {
            if span > 0.0 && span.is_finite() {
                ((v - lo) / span * 255.0).round().clamp(0.0, 255.0) as u8
            } else {
                0 // a flat map has no region worth cropping
            }
        })
        .collect();
    let resized = resize_like_pil(
        &bytes,
        (map_w, map_h),
        0..map_h,
        (width, height),
        fast_image_resize::PixelType::U8,
        Interpolation::Bicubic,
        PassOrder::Pillow,
    );
    GrayImage::from_raw(width, height, resized).expect("resize returns width*height bytes")
}

/// Otsu's threshold of `heat` and the bounding boxes of its external contours, in the order
/// OpenCV's `findContours(RETR_EXTERNAL)` lists them.
pub fn contour_boxes(heat: &GrayImage) -> (u8, Vec<CropBox>) {
    use imageproc::contours::{find_contours_with_threshold, BorderType};
    let level = imageproc::contrast::otsu_level(heat);
    let contours = find_contours_with_threshold::<u32>(heat, level);
    let mut boxes: Vec<CropBox> = contours
        .iter()
        .filter(|c| c.border_type == BorderType::Outer && c.parent.is_none())
        .map(|c| {
            let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
            for p in &c.points {
                x0 = x0.min(p.x);
                y0 = y0.min(p.y);
                x1 = x1.max(p.x);
                y1 = y1.max(p.y);
            }
            CropBox {
                x0,
                y0,
                x1: x1 + 1,
                y1: y1 + 1,
            }
        })
        .collect();
    // imageproc finds borders in raster order; OpenCV returns them last-found first.
    boxes.reverse();
    (level, boxes)
}

/// Step 1.2's selection: largest first (stable for equal areas), overlap rules of `rules`.
pub fn select(
    mut boxes: Vec<CropBox>,
    (width, height): (u32, u32),
    rules: &CropRules,
) -> Vec<CropBox> {
    boxes.sort_by_key(|b| std::cmp::Reverse(b.area()));
    let whole = CropBox {
        x0: 0,
        y0: 0,
        x1: width,
        y1: height,
    };
    let mut kept: Vec<CropBox> = Vec::with_capacity(rules.max_crops);
    for b in boxes {
        if kept.len() == rules.max_crops {
            break;
        }
        if kept.iter().all(|k| b.iou(k) <= rules.max_overlap)
            && b.iou(&whole) < rules.max_whole_image
        {
            kept.push(b);
        }
    }
    kept
}

/// The crop boxes of one image for one neuron map.
pub fn attention_boxes(
    map: &[f32],
    map_size: (u32, u32),
    image_size: (u32, u32),
    rules: &CropRules,
) -> Vec<CropBox> {
    let heat = heatmap(map, map_size, image_size);
    let (_, boxes) = contour_boxes(&heat);
    select(boxes, image_size, rules)
}

/// The pixels of `b` cut from `img`.
pub fn cut(img: &RgbImage, b: &CropBox) -> RgbImage {
    image::imageops::crop_imm(img, b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x0: u32, y0: u32, x1: u32, y1: u32) -> CropBox {
        CropBox { x0, y0, x1, y1 }
    }

    #[test]
    fn iou_by_hand() {
        assert_eq!(b(0, 0, 10, 10).iou(&b(0, 0, 10, 10)), 1.0);
        assert_eq!(b(0, 0, 10, 10).iou(&b(10, 0, 20, 10)), 0.0);
        // 50 shared of 150
        assert!((b(0, 0, 10, 10).iou(&b(5, 0, 15, 10)) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn selection_drops_overlaps_and_near_whole_image_boxes() {
        let rules = CropRules::default();
        let boxes = vec![
            b(0, 0, 95, 95),   // IoU 0.9025 with the 100x100 image: dropped
            b(0, 0, 40, 40),   // kept
            b(5, 5, 45, 45),   // IoU 0.62 with the previous: dropped
            b(60, 60, 90, 90), // kept
            b(0, 60, 10, 70),
            b(20, 60, 30, 70),
            b(40, 60, 50, 70), // fifth survivor: over the limit
        ];
        let kept = select(boxes, (100, 100), &rules);
        assert_eq!(
            kept,
            vec![
                b(0, 0, 40, 40),
                b(60, 60, 90, 90),
                b(0, 60, 10, 70),
                b(20, 60, 30, 70)
            ]
        );
    }

    #[test]
    fn flat_map_has_no_crops() {
        let kept = attention_boxes(&[1.0; 49], (7, 7), (70, 70), &CropRules::default());
        assert!(kept.is_empty());
    }
}
