//! Thumbnails in the terminal: decoded and shrunk on a worker thread (with a crop's box
//! drawn on its original), fitted and encoded for the terminal on a worker thread too, cached,
//! and drawn with the graphics protocol detected at start (kitty, sixel, iTerm2) or Unicode
//! half-blocks. The UI thread only copies finished encodings into the frame.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;

use image::{DynamicImage, Rgb, RgbImage};
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::widgets::StatefulWidget;
use ratatui_image::picker::{Picker, ProtocolType};
use ratatui_image::thread::{ResizeRequest, ResizeResponse, ThreadProtocol};
use ratatui_image::{Resize, StatefulImage};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

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

/// A decoded thumbnail: the protocol state drawn from, and the fit-and-encode requests it
/// makes when drawn at a new size (served on a worker thread).
struct Ready {
    protocol: ThreadProtocol,
    requests: UnboundedReceiver<ResizeRequest>,
}

enum Slot {
    Loading,
    Ready(Box<Ready>),
    Failed,
}

type Decoded = (Thumb, Option<DynamicImage>);
type Encoded = (Thumb, ResizeResponse);

pub struct Thumbs {
    picker: Option<Picker>,
    slots: HashMap<Thumb, Slot>,
    decoded: (mpsc::Sender<Decoded>, mpsc::Receiver<Decoded>),
    encoded: (mpsc::Sender<Encoded>, mpsc::Receiver<Encoded>),
}

impl Thumbs {
    /// `picker` is `None` for `--images off`.
    pub fn new(picker: Option<Picker>) -> Self {
        Self {
            picker,
            slots: HashMap::new(),
            decoded: mpsc::channel(),
            encoded: mpsc::channel(),
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

    /// Takes in thumbnails decoded or encoded since the last call and sends out the encodings
    /// the last draw asked for; true when anything new can be drawn.
    pub fn poll(&mut self) -> bool {
        let mut any = false;
        while let Ok((thumb, img)) = self.decoded.1.try_recv() {
            let slot = match (img, &self.picker) {
                (Some(img), Some(p)) => {
                    let (tx, requests) = unbounded_channel();
                    Slot::Ready(Box::new(Ready {
                        protocol: ThreadProtocol::new(tx, Some(p.new_resize_protocol(img))),
                        requests,
                    }))
                }
                _ => Slot::Failed,
            };
            self.slots.insert(thumb, slot);
            any = true;
        }
        while let Ok((thumb, done)) = self.encoded.1.try_recv() {
            if let Some(Slot::Ready(r)) = self.slots.get_mut(&thumb) {
                any |= r.protocol.update_resized_protocol(done);
            }
        }
        self.dispatch();
        any
    }

    /// Sends the fit-and-encode work asked for by the last draw to worker threads.
    pub fn dispatch(&mut self) {
        for (thumb, slot) in &mut self.slots {
            let Slot::Ready(r) = slot else { continue };
            while let Ok(req) = r.requests.try_recv() {
                let tx = self.encoded.0.clone();
                let thumb = thumb.clone();
                rayon::spawn(move || {
                    // A failed encoding leaves the cell empty; the next resize asks again.
                    if let Ok(done) = req.resize_encode() {
                        let _ = tx.send((thumb, done));
                    }
                });
            }
        }
    }

    /// Draws `thumb` in `area`, starting its decode on first sight.
    pub fn render(&mut self, thumb: &Thumb, area: Rect, buf: &mut Buffer) {
        if self.picker.is_none() || area.is_empty() {
            return;
        }
        match self.slots.get_mut(thumb) {
            Some(Slot::Ready(r)) => {
                StatefulImage::default().resize(Resize::Fit(None)).render(
                    area,
                    buf,
                    &mut r.protocol,
                );
            }
            Some(_) => {}
            None => {
                self.slots.insert(thumb.clone(), Slot::Loading);
                let tx = self.decoded.0.clone();
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
