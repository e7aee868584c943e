//! Probing sets: a folder of images walked recursively in a fixed order, fingerprinted, decoded
//! defensively and preprocessed exactly as torchvision/timm evaluate, streamed in bounded batches.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::UNIX_EPOCH;

pub mod fetch;

use candle_core::{DType, Device, Tensor};
use fast_image_resize as fr;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// File extensions read as images (case-insensitive). Content decides the decoder.
pub const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"];

/// Decompression-bomb guard: larger images are skipped. PIL refuses above ~179 Mpx; a
/// 16384 x 16384 limit and 1 GiB of decode memory keep a bad file from taking the machine down.
pub const MAX_SIDE: u32 = 16_384;
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeImage {
    /// Path relative to the probing set's root, with `/` separators.
    pub rel: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub mtime_ns: i128,
}

/// A probing set: its images in deterministic order and a fingerprint of the listing.
#[derive(Clone, Debug)]
pub struct ProbeSet {
    pub root: PathBuf,
    pub images: Vec<ProbeImage>,
    /// Hex digest of relative paths, sizes and modification times: changes when the set does.
    pub fingerprint: String,
}

fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

impl ProbeSet {
    /// Lists the images under `root` (recursively, following links), sorted by relative path.
    pub fn open(root: &Path) -> Result<Self> {
        let fix = "pass --probe with a folder of images (jpeg, png, webp, bmp, tiff, gif), or run `dnd probe fetch`";
        if !root.is_dir() {
            return Err(Error::Probe {
                path: root.to_path_buf(),
                reason: format!("probing set folder not found. {fix}"),
            });
        }
        let mut images = Vec::new();
        for entry in walkdir::WalkDir::new(root).follow_links(true) {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("probing set: skipping unreadable entry: {e}");
                    continue;
                }
            };
            if !entry.file_type().is_file() || !is_image_name(entry.path()) {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(
                        "{}: skipped, cannot read metadata: {e}",
                        entry.path().display()
                    );
                    continue;
                }
            };
            let mtime_ns = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128);
            let rel = entry
                .path()
                .strip_prefix(root)
                .expect("walkdir yields paths under its root")
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            images.push(ProbeImage {
                rel,
                path: entry.path().to_path_buf(),
                bytes: meta.len(),
                mtime_ns,
            });
        }
        if images.is_empty() {
            return Err(Error::Probe {
                path: root.to_path_buf(),
                reason: format!("the probing set has no images. {fix}"),
            });
        }
        images.sort_by(|a, b| a.rel.cmp(&b.rel));
        let mut h = blake3::Hasher::new();
        for im in &images {
            h.update(im.rel.as_bytes());
            h.update(&[0]);
            h.update(&im.bytes.to_le_bytes());
            h.update(&im.mtime_ns.to_le_bytes());
        }
        let fingerprint = h.finalize().to_hex()[..32].to_string();
        Ok(Self {
            root: root.to_path_buf(),
            images,
            fingerprint,
        })
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

/// Decodes any supported image to 8-bit RGB, upright (EXIF orientation applied), first frame of
/// animations. Errors are one-line reasons; decoder panics on hostile files become errors too.
pub fn decode(path: &Path) -> Result<RgbImage, String> {
    decode_rows(path, &|_, h| h).map(|(img, _)| img)
}

/// [`decode`] where only the first `rows(width, height)` rows of the upright image are used: a
/// JPEG stored upright stops decoding after them. Returns at least those rows (the image's
/// pixels, cut short) and the image's full height.
fn decode_rows(
    path: &Path,
    rows: &(dyn Fn(u32, u32) -> u32 + std::panic::RefUnwindSafe),
) -> Result<(RgbImage, u32), String> {
    let run = || -> Result<(RgbImage, u32), String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
        // The content alone picks the decoder: a file's extension may lie.
        let format = image::guess_format(&bytes)
            .map_err(|_| "not an image (unrecognised content)".to_string())?;
        let mut limits = Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        limits.max_alloc = Some(MAX_DECODE_BYTES);
        let mut reader = ImageReader::with_format(std::io::Cursor::new(&bytes), format);
        reader.limits(limits);
        // Reading the header checks the size limits before any pixel is decoded.
        let mut decoder = reader.into_decoder().map_err(describe_error)?;
        let orientation = decoder
            .orientation()
            .unwrap_or(image::metadata::Orientation::NoTransforms);
        let upright = orientation == image::metadata::Orientation::NoTransforms;
        let jpeg = match format {
            // The rows needed are counted in the upright image: a turned one decodes whole.
            image::ImageFormat::Jpeg => decode_jpeg_like_pil(&bytes, &|w, h| {
                if upright {
                    rows(w, h)
                } else {
                    h
                }
            })?,
            _ => None,
        };
        let mut img = match jpeg {
            Some(cut) if upright => return Ok(cut),
            Some((rgb, _)) => DynamicImage::ImageRgb8(rgb),
            None => DynamicImage::from_decoder(decoder).map_err(describe_error)?,
        };
        img.apply_orientation(orientation);
        let img = img.into_rgb8();
        let height = img.height();
        Ok((img, height))
    };
    std::panic::catch_unwind(run).unwrap_or_else(|_| Err("the decoder crashed on this file".into()))
}

/// Whether JPEG decoding runs libjpeg-turbo's SIMD code. mozjpeg-sys builds without it, and
/// says nothing, when nasm is missing at build time on x86-64: JPEGs then decode at about half
/// the speed.
pub fn jpeg_simd() -> bool {
    extern "C" {
        // libjpeg-turbo's capability query, in every build of it (`jsimd_none.c` answers 0).
        fn jsimd_can_idct_islow() -> std::ffi::c_int;
    }
    // SAFETY: no arguments; it reads the CPU's features (once) and returns a flag.
    unsafe { jsimd_can_idct_islow() != 0 }
}

/// JPEG through libjpeg-turbo's code (mozjpeg), as PIL decodes it: islow IDCT and fancy chroma
/// upsampling, so pixels are bit-identical to the reference's. Decodes the first
/// `rows(width, height)` rows and returns them with the full height. `None` for CMYK/YCCK
/// files, which libjpeg cannot turn into RGB; the image crate decodes those.
fn decode_jpeg_like_pil(
    bytes: &[u8],
    rows: &dyn Fn(u32, u32) -> u32,
) -> Result<Option<(RgbImage, u32)>, String> {
    // libjpeg only warns on a file cut short and fills the rest with grey; PIL refuses such
    // files. In entropy-coded data 0xFF is always stuffed, so an end marker (FF D9) after the
    // first start-of-scan (FF DA) is present exactly when the file is complete. (Searched from
    // the end, where it is, rather than through the whole entropy-coded data.)
    let sos = bytes.windows(2).position(|w| w == [0xFF, 0xDA]);
    let eoi = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    let complete = matches!((sos, eoi), (Some(s), Some(e)) if e > s);
    if !complete {
        return Err("corrupt or truncated image: the JPEG data stops before its end marker".into());
    }
    let fail = |e: std::io::Error| format!("corrupt or truncated image: {e}");
    let d = mozjpeg::Decompress::new_mem(bytes).map_err(fail)?;
    if matches!(
        d.color_space(),
        mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK
    ) {
        return Ok(None);
    }
    let (w, h) = d.size();
    let n = (rows(w as u32, h as u32) as usize).min(h);
    let mut started = d.rgb().map_err(fail)?;
    let mut pixels = vec![0u8; w * n * 3];
    started
        .read_scanlines_into::<u8>(&mut pixels)
        .map_err(fail)?;
    // Rows decode in order and do not depend on those below them, so stopping early changes
    // none of the rows read. (Damage below them goes unnoticed, which a whole decode may report.)
    if n == h {
        started.finish().map_err(fail)?;
    }
    let img = RgbImage::from_raw(w as u32, n as u32, pixels).expect("w * n RGB pixels");
    Ok(Some((img, h as u32)))
}

fn describe_error(e: image::ImageError) -> String {
    match e {
        image::ImageError::Limits(l) => format!(
            "too large to decode safely ({l}; limit {MAX_SIDE} px a side, {} MiB)",
            MAX_DECODE_BYTES >> 20
        ),
        image::ImageError::Unsupported(u) => format!("unsupported image: {u}"),
        other => format!("corrupt or truncated image: {other}"),
    }
}

/// Resampling filter of the resize step; both follow PIL's antialiased kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    Bilinear,
    Bicubic,
}

/// How the resize and crop steps place the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Geometry {
    /// torchvision: shorter side to `resize`, centre crop with offsets rounded half to even.
    Torchvision,
    /// transformers' image processors: shorter side to `resize`, crop offsets floored.
    HfShortestEdge,
    /// transformers' BLIP processor: both sides to `resize`, no crop (`crop == resize`).
    HfSquare,
    /// timm's `crop_mode: squash`: both sides to `resize`, then torchvision's centre crop.
    Squash,
}

/// Evaluation preprocessing: resize, centre crop `crop` x `crop`, to `[0, 1]`, normalised per
/// channel. With [`Geometry::Torchvision`] identical to torchvision's `Resize, CenterCrop,
/// ToTensor, Normalize`; the other geometries follow transformers' PIL image processors.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    pub resize: u32,
    pub crop: u32,
    pub geometry: Geometry,
    pub interpolation: Interpolation,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// torchvision's ImageNet evaluation transform.
    pub fn imagenet() -> Self {
        Self {
            resize: 256,
            crop: 224,
            geometry: Geometry::Torchvision,
            interpolation: Interpolation::Bilinear,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// timm's evaluation transform from a Hub `config.json` (`pretrained_cfg`); `None` when the
    /// file has no such section.
    pub fn from_timm_config(config: &serde_json::Value) -> Option<Self> {
        let cfg = config.get("pretrained_cfg")?;
        let triple = |key: &str| -> Option<[f32; 3]> {
            let v = cfg.get(key)?.as_array()?;
            Some([
                v.first()?.as_f64()? as f32,
                v.get(1)?.as_f64()? as f32,
                v.get(2)?.as_f64()? as f32,
            ])
        };
        let size = cfg
            .get("input_size")
            .and_then(|v| v.as_array())
            .and_then(|v| v.last())
            .and_then(|v| v.as_u64())
            .unwrap_or(224) as u32;
        let crop_pct = cfg
            .get("crop_pct")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.875);
        let interpolation = match cfg.get("interpolation").and_then(|v| v.as_str()) {
            Some("bicubic") => Interpolation::Bicubic,
            _ => Interpolation::Bilinear,
        };
        // timm's fine-tunes at 384 px and others squash the image to a square first.
        let geometry = match cfg.get("crop_mode").and_then(|v| v.as_str()) {
            Some("squash") => Geometry::Squash,
            _ => Geometry::Torchvision,
        };
        Some(Self {
            // timm: scale_size = floor(img_size / crop_pct)
            resize: ((size as f64) / crop_pct).floor() as u32,
            crop: size,
            geometry,
            interpolation,
            mean: triple("mean").unwrap_or([0.485, 0.456, 0.406]),
            std: triple("std").unwrap_or([0.229, 0.224, 0.225]),
        })
    }

    /// transformers' image processor from a Hub `preprocessor_config.json` (BLIP, CLIP, ViT,
    /// ConvNeXT's for microsoft/resnet-*). An integer `size` is the shortest edge when the
    /// processor centre-crops (CLIP's old feature-extractor files) and both sides when it does
    /// not (BLIP's). With a `crop_pct` (ConvNeXT's processor) a size below 384 is the crop of
    /// the image resized to `int(size / crop_pct)` on its shortest edge, and from 384 up both
    /// sides, uncropped.
    pub fn from_hf_processor(config: &serde_json::Value) -> std::result::Result<Self, String> {
        let triple = |key: &str, default: [f32; 3]| -> [f32; 3] {
            match config.get(key).and_then(|v| v.as_array()) {
                Some(v) if v.len() == 3 => {
                    let f = |i: usize| v[i].as_f64().unwrap_or(0.0) as f32;
                    [f(0), f(1), f(2)]
                }
                _ => default,
            }
        };
        let crops = config
            .get("do_center_crop")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let side = |v: &serde_json::Value| -> Option<u32> {
            v.as_u64()
                .or_else(|| v.get("shortest_edge").and_then(|v| v.as_u64()))
                .or_else(|| v.get("height").and_then(|v| v.as_u64()))
                .map(|v| v as u32)
        };
        let size = config
            .get("size")
            .and_then(side)
            .ok_or("preprocessor_config.json has no usable \"size\"")?;
        let crop_pct = config.get("crop_pct").and_then(|v| v.as_f64());
        let square = config
            .get("size")
            .is_some_and(|v| v.get("height").is_some())
            || (config.get("size").is_some_and(|v| v.is_u64()) && !crops);
        let (resize, geometry, crop) = match crop_pct {
            Some(pct) if size < 384 => ((size as f64 / pct) as u32, Geometry::HfShortestEdge, size),
            Some(_) => (size, Geometry::HfSquare, size),
            None if square => (size, Geometry::HfSquare, size),
            None => {
                let crop = config
                    .get("crop_size")
                    .and_then(side)
                    .filter(|_| crops)
                    .unwrap_or(size);
                (size, Geometry::HfShortestEdge, crop)
            }
        };
        let interpolation = match config.get("resample").and_then(|v| v.as_u64()) {
            Some(2) => Interpolation::Bilinear,
            _ => Interpolation::Bicubic, // 3, the value BLIP and CLIP ship
        };
        const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
        const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
        Ok(Self {
            resize,
            crop,
            geometry,
            interpolation,
            mean: triple("image_mean", CLIP_MEAN),
            std: triple("image_std", CLIP_STD),
        })
    }

    /// The image processor a transformers folder ships: its `preprocessor_config.json`, or
    /// else the `image_processor` part of transformers 5's `processor_config.json` (what a
    /// processor saved whole writes); None when it has neither.
    pub fn of_model(model: &crate::hub::ResolvedModel) -> Result<Option<Self>> {
        let label = model.label();
        let (path, config) = if let Some(p) = model.file("preprocessor_config.json") {
            (p, crate::nn::read_json::<serde_json::Value>(&label, p)?)
        } else if let Some(p) = model.file("processor_config.json") {
            let mut all: serde_json::Value = crate::nn::read_json(&label, p)?;
            match all.get_mut("image_processor").map(serde_json::Value::take) {
                Some(image) => (p, image),
                None => return Ok(None),
            }
        } else {
            return Ok(None);
        };
        Self::from_hf_processor(&config)
            .map(Some)
            .map_err(|e| crate::nn::mismatch(&label, Some(path), &e))
    }

    /// Values per preprocessed image (3 x crop x crop): its pixels' bytes, or its floats.
    pub fn values_per_image(&self) -> usize {
        3 * (self.crop as usize).pow(2)
    }

    /// Decoded images as the network's input: (B, 3, crop, crop), normalised, on `device` in
    /// `dtype`. Resized and cropped on every core; normalised where the network runs.
    pub fn batch<I: std::borrow::Borrow<RgbImage> + Sync>(
        &self,
        images: &[I],
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let n = self.values_per_image();
        let mut pixels = vec![0u8; n * images.len()];
        images
            .par_iter()
            .zip(pixels.par_chunks_mut(n))
            .for_each(|(img, out)| self.resize_crop(img.borrow(), out));
        self.input(&pixels, device, dtype)
    }

    /// Resized, cropped pixels of whole images ([`Self::resize_crop`]'s, back to back) as the
    /// network's input on `device` in `dtype`. On CUDA the 8-bit pixels go over, a quarter of
    /// the bytes of f32 ones, and a kernel of ours normalises them there.
    pub fn input(&self, pixels: &[u8], device: &Device, dtype: DType) -> Result<Tensor> {
        let per = self.values_per_image();
        let (n, s) = (pixels.len() / per, self.crop as usize);
        #[cfg(feature = "cuda")]
        if device.is_cuda() && crate::gpu_ops::on(crate::gpu_ops::Kernel::Pixels) {
            let x = Tensor::from_slice(pixels, (n, s, s, 3), device)?;
            return Ok(crate::gpu_ops::normalise_pixels(
                &x, self.mean, self.std, dtype,
            )?);
        }
        let mut floats = vec![0f32; pixels.len()];
        floats
            .par_chunks_mut(per)
            .zip(pixels.par_chunks(per))
            .for_each(|(out, px)| self.normalise(px, out));
        Ok(Tensor::from_vec(floats, (n, 3, s, s), &Device::Cpu)?
            .to_device(device)?
            .to_dtype(dtype)?)
    }

    /// Decodes `path` and returns its resized, cropped pixels ([`Self::resize_crop`]).
    pub fn load(&self, path: &Path) -> Result<Vec<u8>, String> {
        let mut out = vec![0u8; self.values_per_image()];
        self.load_into(path, &mut out)?;
        Ok(out)
    }

    /// [`Self::load`] into `out` (length [`Self::values_per_image`]).
    pub fn load_into(&self, path: &Path, out: &mut [u8]) -> Result<(), String> {
        let (img, height) = decode_rows(path, &|w, h| self.rows_needed(w, h).end)?;
        self.resize_crop_rows(&img, height, out);
        Ok(())
    }

    /// The rows of a `w x h` image that the crop's pixels depend on: those the resize filter
    /// reaches from the crop's rows, and two more each side to spare; every row where Pillow
    /// resamples vertically first.
    fn rows_needed(&self, w: u32, h: u32) -> std::ops::Range<u32> {
        let (nw, nh) = self.resized_size(w, h);
        if self.pass_order().vertical_first((w, h), (nw, nh)) {
            return 0..h;
        }
        let (_, top) = self.crop_origin(nw, nh);
        let last = top + self.crop.min(nh - top).max(1) - 1;
        let scale = h as f64 / nh as f64;
        let support = match self.interpolation {
            Interpolation::Bilinear => 1.0,
            Interpolation::Bicubic => 2.0,
        } * scale.max(1.0);
        let first = ((top as f64 + 0.5) * scale - support).floor() - 2.0;
        let end = ((last as f64 + 0.5) * scale + support).ceil() + 2.0;
        first.max(0.0) as u32..(end.max(0.0) as u32).min(h)
    }

    /// Pillow's for torchvision's and timm's transforms (which resize PIL images); torch's for
    /// transformers' processors (measured on BLIP's: a fifth of the pixels of a tall image
    /// shrunk to a square differ by one level between the two).
    fn pass_order(&self) -> PassOrder {
        match self.geometry {
            Geometry::Torchvision | Geometry::Squash => PassOrder::Pillow,
            Geometry::HfShortestEdge | Geometry::HfSquare => PassOrder::HorizontalFirst,
        }
    }

    /// Where the crop starts in the resized `nw x nh` image. torchvision: int(round((size -
    /// crop) / 2)), with Python's round-half-to-even; transformers: (size - crop) // 2.
    fn crop_origin(&self, nw: u32, nh: u32) -> (u32, u32) {
        let offset = |size: u32| {
            let half = (size as f64 - self.crop as f64) / 2.0;
            let half = match self.geometry {
                Geometry::Torchvision | Geometry::Squash => half.round_ties_even(),
                Geometry::HfShortestEdge | Geometry::HfSquare => half.floor(),
            };
            half.max(0.0) as u32
        };
        (offset(nw), offset(nh))
    }

    /// Size after the resize step, as torchvision computes it: the shorter side becomes
    /// `resize`, the longer one `int(resize * long / short)`; both `resize` when squashed.
    pub fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        if matches!(self.geometry, Geometry::HfSquare | Geometry::Squash) {
            return (self.resize, self.resize);
        }
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        let new_long = ((self.resize as f64) * (long as f64) / (short as f64)) as u32;
        if w <= h {
            (self.resize, new_long)
        } else {
            (new_long, self.resize)
        }
    }

    /// The whole transform of one image on the CPU: its normalised CHW floats into `out`
    /// (length [`Self::values_per_image`]).
    pub fn apply(&self, img: &RgbImage, out: &mut [f32]) {
        let mut pixels = vec![0u8; self.values_per_image()];
        self.resize_crop(img, &mut pixels);
        self.normalise(&pixels, out);
    }

    /// The resize and centre-crop steps: `img` as the `crop x crop` RGB pixels (HWC) that the
    /// normalisation then maps to floats. A resized image smaller than the crop is padded with
    /// black (zeros before normalising, as torchvision pads).
    pub fn resize_crop(&self, img: &RgbImage, out: &mut [u8]) {
        self.resize_crop_rows(img, img.height(), out)
    }

    /// [`Self::resize_crop`] of an image `height` rows high of which `img` holds the first
    /// ones, at least up to the end of [`Self::rows_needed`]; only those are resampled.
    fn resize_crop_rows(&self, img: &RgbImage, height: u32, out: &mut [u8]) {
        assert_eq!(out.len(), self.values_per_image());
        let (w, h) = (img.width(), height);
        let (nw, nh) = self.resized_size(w, h);
        let crop = self.crop;
        let (left, top) = self.crop_origin(nw, nh);
        let rows = self.rows_needed(w, h);
        assert!(
            rows.end <= img.height(),
            "the rows the crop needs are decoded"
        );
        let resized = resize_like_pil(
            img.as_raw(),
            (w, h),
            rows,
            (nw, nh),
            fr::PixelType::U8x3,
            self.interpolation,
            self.pass_order(),
        );
        // The part of the resized image inside the crop, at the crop's top left.
        let (cw, ch) = (crop.min(nw - left) as usize, crop.min(nh - top) as usize);
        let (crop, nw) = (crop as usize, nw as usize);
        out.fill(0);
        for (y, dst) in out.chunks_mut(crop * 3).take(ch).enumerate() {
            let start = ((y + top as usize) * nw + left as usize) * 3;
            dst[..cw * 3].copy_from_slice(&resized[start..start + cw * 3]);
        }
    }

    /// The normalisation step: 8-bit HWC pixels (as [`Self::resize_crop`] writes them) to the
    /// CHW floats `(v / 255 - mean) / std`, by a table of the 256 values per channel (the same
    /// f32 arithmetic per value, done once).
    pub fn normalise(&self, pixels: &[u8], out: &mut [f32]) {
        assert_eq!(out.len(), pixels.len());
        let table = self.table();
        let plane = pixels.len() / 3;
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (((px, r), g), b) in pixels.chunks_exact(3).zip(r).zip(g).zip(b) {
            *r = table[0][px[0] as usize];
            *g = table[1][px[1] as usize];
            *b = table[2][px[2] as usize];
        }
    }

    /// Per channel, the normalised value of each 8-bit level.
    fn table(&self) -> [[f32; 256]; 3] {
        std::array::from_fn(|c| {
            std::array::from_fn(|v| (v as f32 / 255.0 - self.mean[c]) / self.std[c])
        })
    }
}

/// Whether Pillow resamples a `w x h` image to `nw x nh` vertically first: when the height
/// shrinks by more than twice as many rows as the width loses columns, as Pillow 13's
/// `ImagingResampleInner` decides (earlier Pillows always went horizontally first).
fn pil_vertical_first((w, h): (u32, u32), (nw, nh): (u32, u32)) -> bool {
    let (dh, dw) = (h as i64 - nh as i64, w as i64 - nw as i64);
    dh > 0 && dh > 2 * dw
}

/// The order of a resize's two passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PassOrder {
    /// Pillow's (`pil_vertical_first`): torchvision's and timm's transforms resize PIL images.
    Pillow,
    /// Horizontally first always, as torch's antialiased uint8 resize (transformers 5's image
    /// processors) and earlier Pillows do.
    HorizontalFirst,
}

impl PassOrder {
    fn vertical_first(self, from: (u32, u32), to: (u32, u32)) -> bool {
        self == PassOrder::Pillow && pil_vertical_first(from, to)
    }
}

/// Antialiased resize in two passes in `order`, each rounded to 8 bits. (fast_image_resize
/// does vertical first for u8 images, which leaves many pixels one level off where Pillow goes
/// horizontally first; two single-direction passes reproduce Pillow.) `pixels` holds the first
/// rows of a `w x h` image of `pixel_type` (U8 or U8x3), at least up to `rows.end`; only
/// `rows` are resampled (all of them when vertically first), so only output rows whose filter
/// reaches no further are right.
pub(crate) fn resize_like_pil(
    pixels: &[u8],
    (w, h): (u32, u32),
    rows: std::ops::Range<u32>,
    (nw, nh): (u32, u32),
    pixel_type: fr::PixelType,
    interpolation: Interpolation,
    order: PassOrder,
) -> Vec<u8> {
    let filter = match interpolation {
        Interpolation::Bilinear => fr::FilterType::Bilinear,
        Interpolation::Bicubic => fr::FilterType::CatmullRom,
    };
    let opts = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(filter));
    let mut resizer = fr::Resizer::new();
    // The first pass, in one direction: into `mid`.
    let mid = if order.vertical_first((w, h), (nw, nh)) {
        assert_eq!(rows, 0..h, "a vertical first pass reads every row");
        let src = fr::images::ImageRef::new(
            w,
            h,
            &pixels[..(w * h) as usize * pixel_type.size()],
            pixel_type,
        )
        .expect("callers pass w*h pixels of pixel_type");
        let mut tall = fr::images::Image::new(w, nh, pixel_type);
        resizer
            .resize(&src, &mut tall, &opts)
            .expect("same pixel type on both sides");
        tall
    } else {
        // Each row's horizontal pass is on its own, so resampling some rows gives those rows
        // exactly as resampling all of them does.
        let row_bytes = (w * pixel_type.size() as u32) as usize;
        let band = &pixels[rows.start as usize * row_bytes..rows.end as usize * row_bytes];
        let src = fr::images::ImageRef::new(w, rows.len() as u32, band, pixel_type)
            .expect("callers pass w*h pixels of pixel_type");
        let mut wide = fr::images::Image::new(nw, h, pixel_type);
        let mut dst =
            fr::images::CroppedImageMut::new(&mut wide, 0, rows.start, nw, rows.len() as u32)
                .expect("rows lie within the image");
        resizer
            .resize(&src, &mut dst, &opts)
            .expect("same pixel type on both sides");
        wide
    };
    let mut out = fr::images::Image::new(nw, nh, pixel_type);
    resizer
        .resize(&mid, &mut out, &opts)
        .expect("same pixel type on both sides");
    out.into_vec()
}

/// One decoded, resized and cropped batch: `pixels` holds `indices.len()` images'
/// [`Preprocess::resize_crop`] pixels back to back, for [`Preprocess::input`].
#[derive(Debug)]
pub struct Batch {
    /// Indices into [`ProbeSet::images`] of the images that decoded.
    pub indices: Vec<usize>,
    pub pixels: Vec<u8>,
    /// Images of this chunk that could not be decoded, with the reason.
    pub skipped: Vec<(usize, String)>,
}

/// Decodes and preprocesses `images` in parallel (rayon), one batch at a time, handing each to
/// `consume` on the calling thread while the next one is being decoded. At most three batches
/// exist at once, so memory stays bounded whatever the size of the probing set.
pub fn for_each_batch<F>(
    images: &[ProbeImage],
    pre: &Preprocess,
    batch_size: usize,
    cancel: &AtomicBool,
    mut consume: F,
) -> Result<()>
where
    F: FnMut(Batch) -> Result<()>,
{
    let batch_size = batch_size.max(1);
    static SAID: std::sync::Once = std::sync::Once::new();
    if !jpeg_simd() {
        SAID.call_once(|| {
            tracing::warn!(
                "this dnd was built without libjpeg-turbo's SIMD code (on x86-64: nasm was \
                 missing), so JPEGs decode at about half speed. fix: install nasm (apt-get \
                 install nasm, brew install nasm), run `cargo clean -p mozjpeg-sys` (with \
                 `--release` for a release build) and build again"
            )
        });
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(1);
    std::thread::scope(|s| {
        s.spawn(move || {
            for (chunk_no, chunk) in images.chunks(batch_size).enumerate() {
                if cancel.load(Ordering::Relaxed) {
                    break;
                }
                let base = chunk_no * batch_size;
                // Each image decoded straight into its slot of the batch, in parallel (a
                // buffer per image, copied into the batch after, cost a page-faulting
                // allocation and a copy per image).
                let per = pre.values_per_image();
                let mut pixels = vec![0u8; chunk.len() * per];
                let decoded: Vec<Result<(), String>> = pixels
                    .par_chunks_mut(per)
                    .zip(chunk.par_iter())
                    .map(|(slot, im)| pre.load_into(&im.path, slot))
                    .collect();
                let mut batch = Batch {
                    indices: Vec::with_capacity(chunk.len()),
                    pixels: Vec::new(),
                    skipped: Vec::new(),
                };
                // The images that failed leave gaps, closed up in order.
                for (i, r) in decoded.into_iter().enumerate() {
                    match r {
                        Ok(()) => {
                            let kept = batch.indices.len();
                            if kept != i {
                                pixels.copy_within(i * per..(i + 1) * per, kept * per);
                            }
                            batch.indices.push(base + i);
                        }
                        Err(reason) => {
                            tracing::warn!(
                                "{}: skipped: {reason}",
                                images[base + i].path.display()
                            );
                            batch.skipped.push((base + i, reason));
                        }
                    }
                }
                pixels.truncate(batch.indices.len() * per);
                batch.pixels = pixels;
                if tx.send(batch).is_err() {
                    break; // the consumer stopped early
                }
            }
        });
        let mut result = Ok(());
        for batch in rx.iter() {
            if cancel.load(Ordering::Relaxed) {
                result = Err(Error::Cancelled);
                break;
            }
            if let Err(e) = consume(batch) {
                result = Err(e);
                break;
            }
        }
        drop(rx); // unblocks the producer if we stopped early
        if result.is_ok() && cancel.load(Ordering::Relaxed) {
            result = Err(Error::Cancelled);
        }
        result
    })
}

/// Decodes, resizes and crops a few named files (for neuron maps on chosen images): their
/// pixels back to back, for [`Preprocess::input`].
pub fn load_images(paths: &[PathBuf], pre: &Preprocess) -> Result<Vec<u8>> {
    let per: Vec<Result<Vec<u8>>> = paths
        .par_iter()
        .map(|p| {
            pre.load(p).map_err(|reason| Error::Probe {
                path: p.clone(),
                reason,
            })
        })
        .collect();
    let mut all = Vec::with_capacity(paths.len() * pre.values_per_image());
    for r in per {
        all.extend(r?);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every preprocessing kind dnd runs: the target's (torchvision, timm's bicubic), CLIP's
    /// and BLIP's.
    fn preprocessings() -> Vec<Preprocess> {
        let hf = |cfg: serde_json::Value| Preprocess::from_hf_processor(&cfg).unwrap();
        let mut timm = Preprocess::imagenet();
        timm.interpolation = Interpolation::Bicubic;
        timm.resize = 248;
        vec![
            Preprocess::imagenet(),
            timm,
            hf(
                serde_json::json!({"size": {"shortest_edge": 224}, "do_center_crop": true,
                "crop_size": {"height": 224, "width": 224}, "resample": 3}),
            ),
            hf(serde_json::json!({"size": {"height": 384, "width": 384}, "resample": 3})),
            Preprocess::from_timm_config(&serde_json::json!({"pretrained_cfg": {
                "input_size": [3, 128, 128], "crop_pct": 0.8, "crop_mode": "squash"}}))
            .unwrap(),
        ]
    }

    #[test]
    fn pass_order_is_pillows() {
        // As Pillow 13 resizes a 240x417 image (measured: which order gives its pixels).
        for (to, vertical_first) in [
            ((160, 160), true),
            ((100, 100), true),
            ((200, 200), true),
            ((256, 444), false),
            ((160, 278), false),
        ] {
            assert_eq!(pil_vertical_first((240, 417), to), vertical_first, "{to:?}");
        }
    }

    #[test]
    fn convnext_processor_files_resize_by_crop_pct() {
        let hf = |cfg: serde_json::Value| Preprocess::from_hf_processor(&cfg).unwrap();
        let geometry = |p: Preprocess| (p.resize, p.crop, p.geometry, p.interpolation);
        // microsoft/resnet-50's file (feature-extractor form, integer size) and today's.
        for size in [
            serde_json::json!(224),
            serde_json::json!({"shortest_edge": 224}),
        ] {
            let p = hf(
                serde_json::json!({"crop_pct": 0.875, "size": size, "resample": 3,
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}),
            );
            assert_eq!(p.mean, [0.485, 0.456, 0.406]);
            let want = (256, 224, Geometry::HfShortestEdge, Interpolation::Bicubic);
            assert_eq!(geometry(p), want);
        }
        // From 384 up ConvNeXT's processor warps to a square and does not crop.
        let p = hf(serde_json::json!({"crop_pct": 0.875, "size": {"shortest_edge": 384}}));
        assert_eq!(
            geometry(p),
            (384, 384, Geometry::HfSquare, Interpolation::Bicubic)
        );
    }

    /// The crop of the whole resize: every row resampled.
    fn crop_of_whole_resize(pre: &Preprocess, img: &RgbImage) -> Vec<u8> {
        let (w, h) = img.dimensions();
        let (nw, nh) = pre.resized_size(w, h);
        let resized = resize_like_pil(
            img.as_raw(),
            (w, h),
            0..h,
            (nw, nh),
            fr::PixelType::U8x3,
            pre.interpolation,
            pre.pass_order(),
        );
        let (left, top) = pre.crop_origin(nw, nh);
        let crop = pre.crop as usize;
        let mut out = vec![0u8; pre.values_per_image()];
        for y in 0..crop.min((nh - top) as usize) {
            for x in 0..crop.min((nw - left) as usize) {
                let from = ((y + top as usize) * nw as usize + x + left as usize) * 3;
                out[(y * crop + x) * 3..][..3].copy_from_slice(&resized[from..from + 3]);
            }
        }
        out
    }

    #[test]
    fn the_rows_the_crop_needs_give_the_whole_resizes_crop() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for pre in preprocessings() {
            for _ in 0..25 {
                let (w, h) = (rng.random_range(8..700), rng.random_range(8..700));
                let img = RgbImage::from_fn(w, h, |_, _| image::Rgb(rng.random()));
                let rows = pre.rows_needed(w, h);
                assert!(rows.start < rows.end && rows.end <= h, "{w}x{h}: {rows:?}");
                let cut = RgbImage::from_raw(
                    w,
                    rows.end,
                    img.as_raw()[..(w * rows.end * 3) as usize].to_vec(),
                )
                .unwrap();
                let mut out = vec![0u8; pre.values_per_image()];
                pre.resize_crop_rows(&cut, h, &mut out);
                assert!(
                    out == crop_of_whole_resize(&pre, &img),
                    "{w}x{h} {:?}",
                    pre.geometry
                );
            }
        }
    }

    #[test]
    fn a_jpeg_cut_short_decodes_its_first_rows_as_a_whole_decode() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/d_photo.jpg");
        let bytes = std::fs::read(&path).unwrap();
        let (whole, h) = decode_jpeg_like_pil(&bytes, &|_, h| h).unwrap().unwrap();
        assert_eq!(whole.height(), h);
        for n in [1, 7, 8, 9, 15, 16, 17, 200, h - 1] {
            let (cut, full) = decode_jpeg_like_pil(&bytes, &|_, _| n).unwrap().unwrap();
            assert_eq!((cut.height(), full), (n, h));
            assert!(
                cut.as_raw()[..] == whole.as_raw()[..cut.as_raw().len()],
                "{n} rows"
            );
        }
        // load_into decodes part of it, and preprocesses it as the whole image.
        let pre = Preprocess::imagenet();
        assert!(pre.rows_needed(whole.width(), h).end < h);
        assert_eq!(pre.load(&path).unwrap(), crop_of_whole_resize(&pre, &whole));
    }

    #[test]
    fn normalisation_by_table_is_the_per_value_arithmetic() {
        let pre = Preprocess::imagenet();
        let pixels: Vec<u8> = (0..=255u8).cycle().take(3 * 16 * 16).collect();
        let mut out = vec![0f32; pixels.len()];
        pre.normalise(&pixels, &mut out);
        let plane = pixels.len() / 3;
        for (i, px) in pixels.chunks(3).enumerate() {
            for c in 0..3 {
                let want = (px[c] as f32 / 255.0 - pre.mean[c]) / pre.std[c];
                assert_eq!(out[c * plane + i].to_bits(), want.to_bits());
            }
        }
    }
}
