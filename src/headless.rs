//! `dnd describe` and `dnd export`: the pipeline without the TUI. Events become progress
//! bars on stderr and one result per neuron on stdout.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use dnd::activations::ActivationCache;
use dnd::config::Settings;
use dnd::hub;
use dnd::pipeline::{self, Description, Event, Job, Params};
use dnd::store::{Review, Status, Store};
use dnd::workspace::Workspace;

use crate::{ctrl_c_flag, images_bar, DescribeArgs, ExportArgs, ExportFormat, Format};

/// `0-19,42` to neuron numbers, in the order given, without repeats.
fn parse_neurons(spec: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |s: &str| {
            s.trim().parse::<usize>().with_context(|| {
                format!("--neurons {spec:?}: {s:?} is not a neuron number (use e.g. 0-19,42)")
            })
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if b < a {
            bail!("--neurons {spec:?}: range {part} runs backwards");
        }
        for n in a..=b {
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    if out.is_empty() {
        bail!("--neurons {spec:?} names no neuron (use e.g. 0-19,42)");
    }
    Ok(out)
}

fn spinner(progress: &MultiProgress, msg: &str) -> ProgressBar {
    let bar = progress.add(ProgressBar::new_spinner());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(msg.to_string());
    bar
}

/// Finds and loads what `describe` and the terminal UI run on, with download bars and a
/// spinner while the weights load.
pub(crate) fn load(
    rt: &tokio::runtime::Runtime,
    settings: &Settings,
    local_llm: bool,
    progress: &MultiProgress,
) -> Result<Workspace> {
    let resolved = Workspace::resolve(
        rt.handle(),
        settings,
        local_llm,
        &settings.hub_options(hub::Progress::Stderr),
    )?;
    let device = dnd::device::open(settings.device)?;
    let loading = spinner(
        progress,
        &format!("loading models on {}", dnd::device::describe(&device)),
    );
    let ws = resolved.load(settings, &device)?;
    loading.finish_and_clear();
    Ok(ws)
}

pub(crate) fn describe(
    rt: &tokio::runtime::Runtime,
    settings: &Settings,
    local_llm: bool,
    progress: &MultiProgress,
    args: DescribeArgs,
) -> Result<()> {
    if args.show && args.format == Format::Json {
        bail!("--show prints images on standard output, which --format json keeps for JSON lines; use one or the other");
    }
    let params = Params::from_settings(settings, args.pool)?;
    let Workspace {
        models,
        llm,
        probe,
        store,
    } = load(rt, settings, local_llm, progress)?;

    let layer = models.target.layer_index(&args.layer)?;
    let neurons = match &args.neurons {
        Some(spec) => parse_neurons(spec)?,
        None => (0..models.target.layer(layer).neurons).collect(),
    };
    let job = Job {
        layer: args.layer.clone(),
        neurons,
        params,
        force: args.force,
    };
    let cache = ActivationCache::new(&settings.cache_dir);
    let cancel = ctrl_c_flag(rt);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let mut view = Headless::new(progress, &args, &store, &models.target.name, &probe.root);
    let result = std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let ctx = pipeline::Context {
                models: &models,
                probe: &probe,
                store: &store,
                llm: &llm,
                cache: (!args.no_cache).then_some(&cache),
                runtime: rt.handle(),
                events: &tx,
                cancel: &cancel,
            };
            let r = pipeline::run(&ctx, &job);
            drop(tx);
            r
        });
        // A failing view (stdout closed) stops the run; events are still drained so the
        // pipeline never blocks.
        let mut view_error = None;
        while let Some(event) = rx.blocking_recv() {
            if view_error.is_none() {
                if let Err(e) = view.handle(event) {
                    cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                    view_error = Some(e);
                }
            }
        }
        let r = worker.join().expect("the pipeline thread does not panic");
        (r, view_error)
    });
    view.finish();
    let (result, view_error) = result;
    if let Some(e) = view_error {
        return Err(e);
    }
    let summary = result?;
    eprintln!(
        "{} described, {} failed, {} already described (skipped) in {:.1}s; results in {}",
        summary.described.len(),
        summary.failed.len(),
        summary.skipped.len(),
        started.elapsed().as_secs_f64(),
        store.path().display()
    );
    if summary.images_reused > 0 {
        eprintln!(
            "{} synthetic images generated, {} copied from those made before for the same concept",
            summary.images_made, summary.images_reused
        );
    }
    if !summary.failed.is_empty() {
        bail!(
            "{} neuron(s) failed: {:?} (reasons above). Rerun the same command to retry them; described neurons are kept",
            summary.failed.len(),
            summary.failed
        );
    }
    Ok(())
}

/// The headless view of pipeline events.
struct Headless<'a> {
    progress: &'a MultiProgress,
    args: &'a DescribeArgs,
    store: &'a Store,
    target: &'a str,
    probe_root: &'a std::path::Path,
    activations: Option<ProgressBar>,
    neurons: Option<ProgressBar>,
    stage: Option<ProgressBar>,
    header: bool,
}

impl<'a> Headless<'a> {
    fn new(
        progress: &'a MultiProgress,
        args: &'a DescribeArgs,
        store: &'a Store,
        target: &'a str,
        probe_root: &'a std::path::Path,
    ) -> Self {
        Self {
            progress,
            args,
            store,
            target,
            probe_root,
            activations: None,
            neurons: None,
            stage: None,
            header: false,
        }
    }

    fn handle(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Activations { done, total } => {
                let bar = self
                    .activations
                    .get_or_insert_with(|| self.progress.add(images_bar(total)));
                bar.set_position(done as u64);
                if done >= total {
                    bar.finish_and_clear();
                }
            }
            Event::Plan { run, skipped } => {
                if !skipped.is_empty() {
                    let stored = self.store.rows(Some(self.target), Some(&self.args.layer))?;
                    for row in stored.iter().filter(|r| skipped.contains(&r.neuron)) {
                        if let Ok(d) = serde_json::from_value::<Description>(row.record.clone()) {
                            self.print(&d, true)?;
                        }
                    }
                }
                let bar = self.progress.add(ProgressBar::new(run.len() as u64));
                bar.set_style(
                    ProgressStyle::with_template("{bar:40} {pos}/{len} neurons  ETA {eta}  {msg}")
                        .expect("valid template"),
                );
                self.neurons = Some(bar);
                self.stage = Some(spinner(self.progress, ""));
            }
            Event::StageStarted { neuron, stage } => {
                if let Some(s) = &self.stage {
                    s.set_message(format!("neuron {neuron}: {}", stage.name()));
                }
            }
            Event::Warning { message } => tracing::warn!("{message}"),
            Event::Finished { description, .. } => {
                self.print(&description, false)?;
                if let Some(bar) = &self.neurons {
                    bar.inc(1);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn print(&mut self, d: &Description, stored: bool) -> Result<()> {
        let line = match self.args.format {
            Format::Json => serde_json::to_string(d)?,
            Format::Table => {
                let mut line = String::new();
                if !self.header {
                    line.push_str(&format!(
                        "# {} {}\n{:>6}  labels (final score)\n",
                        d.target, d.layer, "neuron"
                    ));
                    self.header = true;
                }
                let body = match d.status {
                    Status::Described => d
                        .labels
                        .iter()
                        .map(|l| format!("{} ({:.2})", l.label, l.score))
                        .collect::<Vec<_>>()
                        .join(" | "),
                    Status::Failed => {
                        format!("FAILED: {}", d.error.as_deref().unwrap_or("unknown"))
                    }
                };
                let mark = if stored { "  (stored)" } else { "" };
                line.push_str(&format!("{:>6}  {body}{mark}", d.neuron));
                line
            }
        };
        self.progress.suspend(|| -> Result<()> {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}")?;
            out.flush()?;
            Ok(())
        })?;
        if self.args.show && d.status == Status::Described {
            self.progress
                .suspend(|| show(self.store, self.probe_root, d));
        }
        Ok(())
    }

    fn finish(&self) {
        for bar in [&self.activations, &self.neurons, &self.stage]
            .into_iter()
            .flatten()
        {
            bar.finish_and_clear();
        }
    }
}

/// Thumbnails of `paths`, side by side, as one image.
fn strip(paths: &[std::path::PathBuf]) -> Option<image::DynamicImage> {
    const SIDE: u32 = 96;
    let thumbs: Vec<image::RgbImage> = paths
        .iter()
        .filter_map(|p| dnd::probe::decode(p).ok())
        .map(|img| image::imageops::thumbnail(&img, SIDE, SIDE))
        .collect();
    if thumbs.is_empty() {
        return None;
    }
    let mut sheet = image::RgbImage::new(thumbs.len() as u32 * (SIDE + 4), SIDE);
    for (i, t) in thumbs.iter().enumerate() {
        image::imageops::overlay(&mut sheet, t, i as i64 * (SIDE as i64 + 4), 0);
    }
    Some(image::DynamicImage::ImageRgb8(sheet))
}

/// `--show`: the neuron's top images, then each candidate's synthetic images, inline.
fn show(store: &Store, probe_root: &std::path::Path, d: &Description) {
    let top: Vec<std::path::PathBuf> = d
        .top_images
        .iter()
        .map(|t| match &t.crop {
            Some(c) => store.images_root().join(&c.file),
            None => probe_root.join(&t.image),
        })
        .collect();
    let mut rows = vec![("top images".to_string(), top)];
    for set in &d.synthetic {
        rows.push((
            set.concept.clone(),
            set.files
                .iter()
                .map(|f| store.images_root().join(f))
                .collect(),
        ));
    }
    for (title, paths) in rows {
        if let Some(img) = strip(&paths) {
            println!("  {title}:");
            let cfg = viuer::Config {
                absolute_offset: false,
                width: Some((paths.len() as u32 * 10).min(120)),
                ..Default::default()
            };
            if let Err(e) = viuer::print(&img, &cfg) {
                tracing::warn!("--show: cannot draw images: {e}");
                return;
            }
        }
    }
}

pub(crate) fn export(settings: &Settings, target: Option<&str>, args: ExportArgs) -> Result<()> {
    if !settings.db.exists() {
        bail!(
            "no results store at {}.\n  fix: run `dnd describe` first, or point --db at the store it wrote",
            settings.db.display()
        );
    }
    let store = Store::open(&settings.db)?;
    let rows: Vec<_> = store
        .rows(target, args.layer.as_deref())?
        .into_iter()
        .filter(|r| args.include_rejected || r.review != Review::Rejected)
        .collect();
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    match args.format {
        ExportFormat::Json => {
            for r in &rows {
                let mut rec = r.record.clone();
                rec["review"] = serde_json::json!(r.review);
                rec["curated_label"] = serde_json::json!(r.curated_label);
                writeln!(out, "{rec}")?;
            }
        }
        ExportFormat::Csv => {
            let mut layers: Vec<(&str, &str)> = rows
                .iter()
                .map(|r| (r.target.as_str(), r.layer.as_str()))
                .collect();
            layers.dedup();
            if layers.len() > 1 {
                let names: Vec<String> =
                    layers.iter().map(|(t, l)| format!("{l} of {t}")).collect();
                bail!(
                    "the store holds several layers ({}); CSV has the reference's per-layer columns.\n  fix: choose one with --layer (and --target), or use --format json",
                    names.join(", ")
                );
            }
            // The reference's columns; a Status column once a person has reviewed labels.
            let reviewed = rows.iter().any(|r| r.review != Review::Unreviewed);
            let mut w = csv::Writer::from_writer(&mut out);
            let mut header = vec!["Neuron ID", "Label 1", "Label 2", "Label 3"];
            if reviewed {
                header.push("Status");
            }
            w.write_record(&header)?;
            for r in rows.iter().filter(|r| r.status == Status::Described) {
                let mut labels: Vec<String> = r.record["labels"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|l| l["label"].as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                if let Some(c) = &r.curated_label {
                    labels.retain(|l| l != c);
                    labels.insert(0, c.clone());
                }
                let label = |i: usize| labels.get(i).cloned().unwrap_or_default();
                let mut record = vec![r.neuron.to_string(), label(0), label(1), label(2)];
                if reviewed {
                    record.push(r.review.as_str().to_string());
                }
                w.write_record(&record)?;
            }
            w.flush()?;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_neurons;

    #[test]
    fn neuron_lists_and_ranges() {
        assert_eq!(parse_neurons("0-3,42, 2").unwrap(), vec![0, 1, 2, 3, 42]);
        assert!(parse_neurons("3-1").is_err());
        assert!(parse_neurons("a")
            .unwrap_err()
            .to_string()
            .contains("\"a\""));
        assert!(parse_neurons(",").is_err());
    }
}
