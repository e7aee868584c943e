//! Attention crops against OpenCV (`cv2.threshold(THRESH_OTSU)`, `findContours(RETR_EXTERNAL)`,
//! `boundingRect`) and PIL's resize, on the maps of tools/gen_pipeline_fixtures.py.

mod common;

use common::{fixtures, reference};
use dnd::crops::{self, CropBox, CropRules};
use image::GrayImage;

#[derive(serde::Deserialize)]
struct Case {
    width: u32,
    height: u32,
    threshold: u8,
    boxes: Vec<[u32; 4]>,
    kept: Vec<[u32; 4]>,
}

fn cases() -> Vec<Case> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("crops.json")).unwrap()).unwrap()
}

fn arrays(boxes: &[CropBox]) -> Vec<[u32; 4]> {
    boxes.iter().map(CropBox::as_array).collect()
}

#[test]
fn threshold_and_boxes_equal_opencv() {
    let refs = reference("crops.safetensors");
    for (i, case) in cases().iter().enumerate() {
        let heat: Vec<u8> = refs[&format!("heat{i}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|v| v as u8)
            .collect();
        let heat = GrayImage::from_raw(case.width, case.height, heat).unwrap();
        let (level, boxes) = crops::contour_boxes(&heat);
        assert_eq!(level, case.threshold, "Otsu threshold of case {i}");
        assert_eq!(arrays(&boxes), case.boxes, "contour boxes of case {i}");
        let kept = crops::select(boxes, (case.width, case.height), &CropRules::default());
        assert_eq!(arrays(&kept), case.kept, "kept boxes of case {i}");
    }
}

#[test]
fn heatmap_matches_pil_and_the_whole_path_keeps_the_same_boxes() {
    let refs = reference("crops.safetensors");
    for (i, case) in cases().iter().enumerate() {
        let map = &refs[&format!("map{i}")];
        let (mh, mw) = map.dims2().unwrap();
        let map = map.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let size = (case.width, case.height);
        let ours = crops::heatmap(&map, (mw as u32, mh as u32), size);
        let theirs = refs[&format!("heat{i}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let worst = ours
            .as_raw()
            .iter()
            .zip(&theirs)
            .map(|(&a, &b)| (a as f32 - b).abs())
            .fold(0f32, f32::max);
        let off = ours
            .as_raw()
            .iter()
            .zip(&theirs)
            .filter(|(&a, &b)| a as f32 != b)
            .count();
        // fast_image_resize's fixed point rounds a few steep upscaled pixels differently from
        // PIL's: under 1% of pixels, at most 2 levels; the boxes below come out the same.
        assert!(
            worst <= 2.0,
            "case {i}: heat map differs from PIL's by {worst} levels"
        );
        assert!(
            off * 100 < theirs.len(),
            "case {i}: {off} pixels differ from PIL's"
        );
        let kept =
            crops::attention_boxes(&map, (mw as u32, mh as u32), size, &CropRules::default());
        assert_eq!(
            arrays(&kept),
            case.kept,
            "kept boxes of case {i} from the raw map"
        );
    }
}
