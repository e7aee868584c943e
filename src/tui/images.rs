//! Thumbnails in the terminal: decoded and shrunk on a worker thread (with a crop's box
//! drawn on its original), cached, and drawn with the graphics protocol detected at start
//! (kitty, sixel, iTerm2) or Unicode half-blocks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;

use image::{DynamicImage, Rgb, RgbImage};
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::widgets::StatefulWidget;
use ratatui_image::picker::{Picker, ProtocolType};
use ratatui_image::protocol::StatefulProtocol;
use ratatui_image::{Resize, StatefulImage};

/// Longest side of a decoded thumbnail, in pixels.
const SIDE: u32 = 160;

/// How images are shown: `--images`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageMode {
    /// Ask the terminal once at start; half-blocks when it answers nothing useful.
    #[default]
    Auto,
    Kitty,
    Sixel,
    Iterm2,
    Halfblocks,
    Off,
}

/// An image to show: a file, optionally with a box (in its pixels) drawn on it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Thumb {
    pub path: PathBuf,
    pub bbox: Option<[u32; 4]>,
}

enum Slot {
    Loading,
    Ready(Box<StatefulProtocol>),
    Failed,
}

pub struct Thumbs {
    picker: Option<Picker>,
    slots: HashMap<Thumb, Slot>,
    done_tx: mpsc::Sender<(Thumb, Option<DynamicImage>)>,
    done_rx: mpsc::Receiver<(Thumb, Option<DynamicImage>)>,
}

impl Thumbs {
    /// `picker` is `None` for `--images off`.
    pub fn new(picker: Option<Picker>) -> Self {
        let (done_tx, done_rx) = mpsc::channel();
        Self {
            picker,
            slots: HashMap::new(),
            done_tx,
            done_rx,
        }
    }

    /// The picker for `mode`. `Auto` queries the terminal (before the UI takes stdin) and
    /// falls back to half-blocks.
    pub fn picker(mode: ImageMode) -> Option<Picker> {
        let forced = match mode {
            ImageMode::Off => return None,
            ImageMode::Auto => None,
            ImageMode::Kitty => Some(ProtocolType::Kitty),
            ImageMode::Sixel => Some(ProtocolType::Sixel),
            ImageMode::Iterm2 => Some(ProtocolType::Iterm2),
            ImageMode::Halfblocks => return Some(Picker::halfblocks()),
        };
        let mut picker = Picker::from_query_stdio().unwrap_or_else(|_| Picker::halfblocks());
        if let Some(p) = forced {
            picker.set_protocol_type(p);
        }
        Some(picker)
    }

    /// Takes in thumbnails decoded since the last call; true when any arrived.
    pub fn poll(&mut self) -> bool {
        let mut any = false;
        while let Ok((thumb, img)) = self.done_rx.try_recv() {
            let slot = match (img, &self.picker) {
                (Some(img), Some(p)) => Slot::Ready(Box::new(p.new_resize_protocol(img))),
                _ => Slot::Failed,
            };
            self.slots.insert(thumb, slot);
            any = true;
        }
        any
    }

    /// Draws `thumb` in `area`, starting its decode on first sight.
    pub fn render(&mut self, thumb: &Thumb, area: Rect, buf: &mut Buffer) {
        if self.picker.is_none() || area.is_empty() {
            return;
        }
        match self.slots.get_mut(thumb) {
            Some(Slot::Ready(p)) => {
                StatefulImage::default()
                    .resize(Resize::Fit(None))
                    .render(area, buf, p.as_mut());
            }
            Some(_) => {}
            None => {
                self.slots.insert(thumb.clone(), Slot::Loading);
                let tx = self.done_tx.clone();
                let t = thumb.clone();
                rayon::spawn(move || {
                    let img = load(&t);
                    let _ = tx.send((t, img));
                });
            }
        }
    }
}

/// Decodes, shrinks and marks one thumbnail (worker thread).
fn load(t: &Thumb) -> Option<DynamicImage> {
    let img = crate::probe::decode(&t.path).ok()?;
    let (w, h) = img.dimensions();
    let s = (SIDE as f32 / w.max(h) as f32).min(1.0);
    let size = |v: u32| ((v as f32 * s) as u32).max(1);
    let mut small = image::imageops::thumbnail(&img, size(w), size(h));
    if let Some(b) = t.bbox {
        let (sw, sh) = small.dimensions();
        let sx = |x: u32| ((x as f32 * sw as f32 / w as f32) as u32).min(sw - 1);
        let sy = |y: u32| ((y as f32 * sh as f32 / h as f32) as u32).min(sh - 1);
        outline(&mut small, sx(b[0]), sy(b[1]), sx(b[2]), sy(b[3]));
    }
    Some(DynamicImage::ImageRgb8(small))
}

fn outline(img: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32) {
    let red = Rgb([255, 40, 40]);
    for x in x0..=x1 {
        img.put_pixel(x, y0, red);
        img.put_pixel(x, y1, red);
    }
    for y in y0..=y1 {
        img.put_pixel(x0, y, red);
        img.put_pixel(x1, y, red);
    }
}
