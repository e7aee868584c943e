//! Probing sets: listing, fingerprints, preprocessing parity with torchvision/timm, and every
//! decoding edge case the issue names.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use common::*;
use dnd::probe::{self, Interpolation, Preprocess, ProbeSet};

fn stats(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let mut sum = 0f64;
    let mut max = 0f32;
    for (a, b) in got.iter().zip(want) {
        let d = (a - b).abs();
        sum += d as f64;
        max = max.max(d);
    }
    ((sum / got.len() as f64) as f32, max)
}

fn check_against(key_prefix: &str, pre: &Preprocess, names: &[&str]) {
    let reference = reference("preprocess.safetensors");
    for name in names {
        let img = probe::decode(&fixtures().join("images").join(name)).unwrap();
        let mut got = vec![0f32; pre.values_per_image()];
        pre.apply(&img, &mut got);
        let want = reference[&format!("{key_prefix}/{name}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (mean, max) = stats(&got, &want);
        assert!(
            mean < 1e-3 && max < 2e-2,
            "{key_prefix} {name}: mean abs diff {mean}, max {max}"
        );
    }
}

#[test]
fn preprocessing_matches_torchvision() {
    check_against(
        "torchvision",
        &Preprocess::imagenet(),
        &[
            "a_landscape.png",
            "b_portrait.png",
            "c_small.png",
            "d_photo.jpg",
        ],
    );
}

#[test]
fn preprocessing_from_timm_config_matches_timm_transform() {
    let t = load_fixture_target("vit_tiny");
    assert_eq!(t.preprocess.interpolation, Interpolation::Bicubic);
    assert_eq!((t.preprocess.resize, t.preprocess.crop), (248, 224));
    check_against(
        "timm_vit",
        &t.preprocess,
        &["a_landscape.png", "b_portrait.png"],
    );
}

#[test]
fn timm_squash_crop_mode_matches_timm_transform() {
    // timm's crop_mode squash: both sides to floor(128 / 0.8) = 160, then the centre 128.
    let config = serde_json::json!({"pretrained_cfg": {
        "input_size": [3, 128, 128], "crop_pct": 0.8, "crop_mode": "squash",
        "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    }});
    let squash = Preprocess::from_timm_config(&config).unwrap();
    assert_eq!(squash.resized_size(333, 250), (160, 160));
    let images = ["a_landscape.png", "b_portrait.png"];
    check_against("timm_squash", &squash, &images);
    // The centre mode keeps the aspect and crops another part of the picture.
    let centre = Preprocess {
        geometry: probe::Geometry::Torchvision,
        ..squash
    };
    let reference = reference("preprocess.safetensors");
    let mut got = vec![0f32; centre.values_per_image()];
    let img = probe::decode(&fixtures().join("images").join(images[0])).unwrap();
    centre.apply(&img, &mut got);
    let want = reference[&format!("timm_squash/{}", images[0])]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (mean, _) = stats(&got, &want);
    assert!(mean > 0.05, "centre crop vs squash: mean abs diff {mean}");
}

#[test]
fn resize_follows_torchvision_rounding() {
    let p = Preprocess::imagenet();
    assert_eq!(p.resized_size(333, 250), (340, 256));
    assert_eq!(p.resized_size(240, 417), (256, 444));
    assert_eq!(p.resized_size(100, 80), (320, 256));
}

fn write_png(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]))
        .save(path)
        .unwrap();
}

#[test]
fn listing_is_recursive_sorted_and_fingerprinted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("b/c")).unwrap();
    write_png(&dir.path().join("b/c/z.png"), 4, 4);
    write_png(&dir.path().join("a.PNG"), 4, 4);
    write_png(&dir.path().join("b/y.png"), 4, 4);
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    let set = ProbeSet::open(dir.path()).unwrap();
    let rels: Vec<&str> = set.images.iter().map(|i| i.rel.as_str()).collect();
    assert_eq!(rels, ["a.PNG", "b/c/z.png", "b/y.png"]);
    let again = ProbeSet::open(dir.path()).unwrap();
    assert_eq!(set.fingerprint, again.fingerprint);
    write_png(&dir.path().join("b/new.png"), 4, 4);
    assert_ne!(
        ProbeSet::open(dir.path()).unwrap().fingerprint,
        set.fingerprint
    );
}

#[test]
fn empty_or_missing_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let msg = ProbeSet::open(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("no images") && msg.contains("--probe"),
        "{msg}"
    );
    let msg = ProbeSet::open(&dir.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not found") && msg.contains("nope"), "{msg}");
}

#[test]
fn decoding_edge_cases_are_handled_or_skipped_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Handled: grayscale, alpha, 16-bit, CMYK, EXIF orientation, GIF first frame, webp/bmp/tiff.
    image::GrayImage::from_pixel(10, 6, image::Luma([200]))
        .save(d.join("gray.png"))
        .unwrap();
    image::RgbaImage::from_pixel(10, 6, image::Rgba([10, 20, 30, 0]))
        .save(d.join("alpha.png"))
        .unwrap();
    image::RgbImage::from_pixel(9, 5, image::Rgb([1, 2, 3]))
        .save(d.join("pic.bmp"))
        .unwrap();
    image::RgbImage::from_pixel(9, 5, image::Rgb([1, 2, 3]))
        .save(d.join("pic.tiff"))
        .unwrap();
    image::RgbaImage::from_pixel(9, 5, image::Rgba([1, 2, 3, 255]))
        .save(d.join("pic.webp"))
        .unwrap();
    {
        let f = std::fs::File::create(d.join("anim.gif")).unwrap();
        let mut enc = image::codecs::gif::GifEncoder::new(f);
        let first = image::Frame::new(image::RgbaImage::from_pixel(
            8,
            8,
            image::Rgba([255, 0, 0, 255]),
        ));
        let second = image::Frame::new(image::RgbaImage::from_pixel(
            8,
            8,
            image::Rgba([0, 0, 255, 255]),
        ));
        enc.encode_frames([first, second]).unwrap();
    }
    for f in ["cmyk.jpg", "exif_rotated.jpg", "gray16.png", "bomb.png"] {
        std::fs::copy(fixtures().join("edge").join(f), d.join(f)).unwrap();
    }
    // Skipped: truncated, corrupt, not an image, a text file named .jpg, empty file.
    let png = std::fs::read(fixtures().join("images/c_small.png")).unwrap();
    std::fs::write(d.join("truncated.png"), &png[..png.len() / 3]).unwrap();
    let jpg = std::fs::read(fixtures().join("images/d_photo.jpg")).unwrap();
    std::fs::write(d.join("truncated.jpg"), &jpg[..jpg.len() * 2 / 3]).unwrap();
    let mut corrupt = png.clone();
    for b in corrupt.iter_mut().skip(100).take(400) {
        *b = 0xAB;
    }
    std::fs::write(d.join("corrupt.png"), &corrupt).unwrap();
    std::fs::write(d.join("text.jpg"), "hello, I am not a picture").unwrap();
    std::fs::write(d.join("empty.webp"), b"").unwrap();

    let ok = |name: &str| probe::decode(&d.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(ok("gray.png").get_pixel(0, 0).0, [200, 200, 200]);
    assert_eq!(ok("alpha.png").get_pixel(0, 0).0, [10, 20, 30]);
    let g16 = ok("gray16.png");
    assert_eq!(g16.dimensions(), (32, 24));
    assert_eq!(g16.get_pixel(31, 23).0, [255, 255, 255]);
    assert_eq!(ok("cmyk.jpg").dimensions(), (64, 48));
    // Stored 20 wide x 40 high with orientation 6: upright it is 40 wide, red on the right
    // (the stored top half, red, rotates 90 degrees clockwise to the right side).
    let upright = ok("exif_rotated.jpg");
    assert_eq!(upright.dimensions(), (40, 20));
    let right = upright.get_pixel(35, 10).0;
    let left = upright.get_pixel(4, 10).0;
    assert!(right[0] > 200 && right[2] < 60, "right {right:?}");
    assert!(left[2] > 200 && left[0] < 60, "left {left:?}");
    assert_eq!(ok("anim.gif").get_pixel(3, 3).0, [255, 0, 0]);
    for f in ["pic.bmp", "pic.tiff", "pic.webp"] {
        assert_eq!(ok(f).dimensions(), (9, 5));
    }
    let bad = |name: &str, word: &str| {
        let e = probe::decode(&d.join(name)).unwrap_err();
        assert!(e.contains(word), "{name}: {e}");
    };
    bad("bomb.png", "too large");
    bad("truncated.png", "corrupt or truncated");
    bad("truncated.jpg", "truncated");
    bad("text.jpg", "not an image");
    bad("empty.webp", "not an image");
    assert!(probe::decode(&d.join("corrupt.png")).is_err());

    // Streaming over the whole folder: every good image decoded, every bad one named.
    let set = ProbeSet::open(d).unwrap();
    let pre = Preprocess::imagenet();
    let mut decoded = Vec::new();
    let mut skipped = Vec::new();
    let per = pre.values_per_image();
    // Batches of two: bomb.png, skipped, comes before cmyk.jpg in one.
    probe::for_each_batch(&set.images, &pre, 2, &AtomicBool::new(false), |b| {
        assert_eq!(b.pixels.len(), b.indices.len() * per);
        // Each kept image's pixels in its place, the skipped ones' gaps closed up.
        for (k, &i) in b.indices.iter().enumerate() {
            let want = pre.load(&set.images[i].path).unwrap();
            assert!(
                b.pixels[k * per..(k + 1) * per] == want[..],
                "{}",
                set.images[i].rel
            );
        }
        decoded.extend(b.indices.iter().map(|&i| set.images[i].rel.clone()));
        skipped.extend(b.skipped.iter().map(|(i, _)| set.images[*i].rel.clone()));
        Ok(())
    })
    .unwrap();
    skipped.sort();
    assert_eq!(
        skipped,
        [
            "bomb.png",
            "corrupt.png",
            "empty.webp",
            "text.jpg",
            "truncated.jpg",
            "truncated.png"
        ]
    );
    assert_eq!(decoded.len(), 9);
}

#[test]
fn cancelling_stops_the_stream() {
    let set = ProbeSet::open(&fixtures().join("images")).unwrap();
    let cancel = AtomicBool::new(false);
    let mut seen = 0;
    let r = probe::for_each_batch(&set.images, &Preprocess::imagenet(), 1, &cancel, |_| {
        seen += 1;
        cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    });
    assert!(matches!(r, Err(dnd::Error::Cancelled)));
    assert_eq!(seen, 1);
}

#[test]
fn images_are_extracted_from_a_hub_parquet_shard() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("probe/validation-00000-of-00001");
    let n = probe::fetch::extract_images(&fixtures().join("probe_shard.parquet"), &out).unwrap();
    assert_eq!(n, 3, "three images and one null row");
    let set = ProbeSet::open(&dir.path().join("probe")).unwrap();
    let rels: Vec<&str> = set.images.iter().map(|i| i.rel.as_str()).collect();
    assert_eq!(
        rels,
        [
            "validation-00000-of-00001/00000.png",
            "validation-00000-of-00001/00001.jpg",
            "validation-00000-of-00001/00003.jpg"
        ]
    );
    // Byte-identical to the files that went in.
    let got = std::fs::read(out.join("00000.png")).unwrap();
    assert_eq!(
        got,
        std::fs::read(fixtures().join("images/c_small.png")).unwrap()
    );
    assert!(!dir
        .path()
        .join("probe/validation-00000-of-00001.partial")
        .exists());
    // Not a parquet file: a clear error naming it.
    let bogus = dir.path().join("bogus.parquet");
    std::fs::write(&bogus, b"nope").unwrap();
    let msg = probe::fetch::extract_images(&bogus, &dir.path().join("x"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("bogus.parquet") && msg.contains("parquet"),
        "{msg}"
    );
}
