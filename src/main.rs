//! The `dnd` command line.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use dnd::activations::{self, ActivationCache, Pool};

/// jemalloc keeps freed pages for reuse: the models' tensors of tens to hundreds of megabytes
/// are allocated and freed at every layer, and glibc hands each one back to the kernel, so
/// every new one is faulted in and zeroed again (13% of a CPU UNet step's profile; 5% with
/// jemalloc).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use dnd::config::{self, Settings, SettingsArgs};
use dnd::hub::{self, HubOptions, Role};
use dnd::probe::ProbeSet;
use dnd::target::{LayerKind, Target};

mod headless;

/// Describe-and-Dissect: explains what hidden neurons of vision networks detect.
///
/// Without a subcommand, `dnd` opens the terminal UI: a set-up screen while the models load
/// (listing, downloading with `d`, what is missing; LLM endpoint settings), then pick a layer
/// and a neuron, watch its description being made, accept / edit / reject its label. Every setting can come from the settings file (`dnd config path`), a DND_* environment
/// variable or a flag; `dnd config show` prints the effective values and their sources.
#[derive(Parser, Debug)]
#[command(name = "dnd", version, max_term_width = 100)]
struct Cli {
    /// Settings file to read instead of the default one
    #[arg(long, global = true, env = "DND_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(flatten)]
    settings: SettingsArgs,

    #[command(flatten)]
    ui: UiArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

/// The terminal UI's own flags (it also takes every setting above).
#[derive(clap::Args, Debug)]
struct UiArgs {
    /// Open straight into this layer's neuron list.
    #[arg(long)]
    layer: Option<String>,
    /// With --layer: open this neuron's run view (running it when it has no description yet).
    #[arg(long, requires = "layer")]
    neuron: Option<usize>,
    /// How images are drawn: detected once at start (auto), a graphics protocol, Unicode
    /// half-blocks (plain SSH, tmux, screen) or not at all.
    #[arg(long, value_enum, default_value_t = dnd::tui::images::ImageMode::Auto)]
    images: dnd::tui::images::ImageMode,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Describe neurons of a layer: top images and crops, BLIP captions, LLM candidate
    /// concepts, Stable Diffusion images, scores, labels. Results go to the store (--db);
    /// neurons already described with the same settings are skipped.
    Describe(DescribeArgs),
    /// Write the stored labels as CSV (the reference's columns) or JSON lines (everything).
    Export(ExportArgs),
    /// Pooled activations of every neuron of a layer over the probing set (cached), and each
    /// neuron's top images.
    Activations(ActivationsArgs),
    /// List the layers of the target network with neuron counts and output shapes.
    Layers,
    /// Time every default architecture at its published size with random weights (nothing is
    /// downloaded) on --device: ResNet-50 activations (tensors and JPEG files), BLIP captions,
    /// SD-Turbo and SD v1.4 (UNet step, VAE, whole generations at 1, 4, 50 steps), CLIP, and
    /// seconds per neuron end to end (fast and paper presets, an LLM that answers at once),
    /// each the median of several runs after a warm-up, with peak memory.
    Bench(BenchArgs),
    /// List the configured models: where they are, whether they are on disk, their sizes.
    Models {
        #[command(subcommand)]
        action: Option<ModelsAction>,
    },
    /// Show the settings and where the settings file lives.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Inspect the probing set.
    Probe {
        #[command(subcommand)]
        action: ProbeAction,
    },
}

#[derive(Subcommand, Debug)]
enum ModelsAction {
    /// Download every configured model that is not on disk yet (into the Hugging Face cache).
    Fetch,
}

#[derive(Subcommand, Debug)]
enum ConfigAction {
    /// Print every effective setting with its source (secrets masked).
    Show,
    /// Print the path of the settings file.
    Path,
}

#[derive(Subcommand, Debug)]
enum ProbeAction {
    /// Count the images of the probing set, decode them all, and report the ones that fail.
    Check,
    /// Download a default probing set from the Hub into the --probe folder: Open Images V7
    /// validation photos (CC BY 2.0), about 3,100 images and 950 MB with the default 2 shards.
    Fetch {
        /// Hub dataset with images in parquet shards (the datasets Image feature).
        #[arg(long, default_value = dnd::probe::fetch::DEFAULT_DATASET)]
        dataset: String,
        /// Only shards whose file name contains this (a split name).
        #[arg(long, default_value = dnd::probe::fetch::DEFAULT_PATTERN)]
        pattern: String,
        /// How many shards to download (each ~480 MB, ~1,550 photos for the default dataset).
        #[arg(long, default_value_t = dnd::probe::fetch::DEFAULT_SHARDS)]
        shards: usize,
    },
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Reduced models and batches of the same families: minutes on a laptop CPU, for CI
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Only the measurements whose names start with these (e.g. resnet50,sd-turbo.unet,e2e.fast)
    #[arg(long, value_delimiter = ',', value_name = "PREFIXES")]
    only: Vec<String>,
    /// Timed runs per measurement after one warm-up (the median is reported)
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds after which a measurement stops repeating (it always runs once)
    #[arg(long, default_value_t = 20.0, value_name = "SECONDS")]
    budget: f64,
    /// Neurons of the amortised end-to-end runs (default 64; 2 with --quick)
    #[arg(long)]
    neurons: Option<usize>,
    /// Seconds each answer of the end-to-end runs' mock LLM takes (0: at once): how much of an
    /// endpoint's latency the pipeline hides behind the models' work
    #[arg(long, default_value_t = 0.0, value_name = "SECONDS")]
    llm_latency: f64,
    /// Distinct concepts the end-to-end runs' mock LLM answers with, in turn (0: a new one every
    /// answer). Neurons of a real layer share concepts, and a job copies the images of a
    /// concept it has made rather than generating them again: this measures what that saves
    #[arg(long, default_value_t = 0, value_name = "N")]
    llm_concepts: usize,
    /// Scratch folder for configs, tokenizers, JPEGs and stores (default: <cache_dir>/bench)
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
    /// Check results instead of timing: each model at reduced size with the same weights on
    /// the CPU (f32) and on --device, compared; on a GPU without --quick also full-size
    /// batches against their rows alone. Fails when any differs beyond its tolerance
    #[arg(long)]
    check: bool,
}

#[derive(clap::Args, Debug)]
struct ActivationsArgs {
    /// Layer(s) by PyTorch module name, comma-separated (`layer4`, `layer3.1`, `fc`, `blocks.7`);
    /// several layers share one pass over the images. `dnd layers` lists them.
    #[arg(long, short, value_delimiter = ',', required = true)]
    layer: Vec<String>,
    /// How a neuron's spatial map becomes one number (ViT token layers use the CLS token).
    #[arg(long, value_enum, default_value_t = Pool::Mean)]
    pool: Pool,
    /// How many top images to print per neuron.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Only this neuron (default: every neuron of the layer).
    #[arg(long, short)]
    neuron: Option<usize>,
    /// Also print the neuron's spatial map on each of its top images (needs --neuron).
    #[arg(long, requires = "neuron")]
    maps: bool,
    /// Output format: an aligned table, or JSON, one object per line.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Recompute even if a cached result exists.
    #[arg(long)]
    no_cache: bool,
}

#[derive(clap::Args, Debug)]
struct DescribeArgs {
    /// Layer by PyTorch module name (`layer4`, `fc`, `blocks.7`); `dnd layers` lists them.
    #[arg(long, short)]
    layer: String,
    /// Neurons: numbers and ranges, comma-separated (`0-19,42`). Default: every neuron of
    /// the layer.
    #[arg(long, short, value_name = "LIST")]
    neurons: Option<String>,
    /// How a neuron's spatial map becomes one number (ViT token layers use the CLS token).
    #[arg(long, value_enum, default_value_t = Pool::Mean)]
    pool: Pool,
    /// Output: a line per neuron with its labels, or one JSON object per neuron per line
    /// with everything (top images, crops, captions, candidates, scores, files, timings).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Also print each neuron's top images and synthetic images in the terminal (kitty,
    /// iTerm2 or Unicode half-blocks; table format only).
    #[arg(long)]
    show: bool,
    /// Describe again neurons already described with the same settings (LLM answers and
    /// synthetic images the store already has are still copied from it).
    #[arg(long)]
    force: bool,
    /// Recompute the layer's activations even if a cached result exists.
    #[arg(long)]
    no_cache: bool,
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    /// csv: Neuron ID, Label 1, Label 2, Label 3 (described neurons of one layer; Label 1 is
    /// the curated label where there is one), plus a Status column once any label has been
    /// accepted, edited or rejected; json: one stored record per line with its review,
    /// failed neurons included.
    #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
    format: ExportFormat,
    /// Also export neurons whose label was rejected.
    #[arg(long)]
    include_rejected: bool,
    /// Only this layer (needed for CSV when the store holds several).
    #[arg(long, short)]
    layer: Option<String>,
    /// Write here instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ExportFormat {
    Csv,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            if e.downcast_ref::<dnd::Error>()
                .is_some_and(|e| matches!(e, dnd::Error::Cancelled))
            {
                eprintln!("dnd: interrupted; nothing partial was written");
                130
            } else {
                eprintln!("error: {e:#}");
                1
            }
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<()> {
    let loaded = config::load(cli.config.as_deref(), &cli.settings)?;
    let progress = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let settings = &loaded.settings;
    dnd::device::keep_kernels_in(settings.cache_dir.join("kernels"));
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let Some(command) = cli.command else {
        // The UI owns the screen: logs go to a file.
        let log = settings.cache_dir.join("dnd.log");
        init_logging(&settings.log_level, LogTo::File(log.clone()))?;
        let source = dnd::tui::SettingsSource {
            file: cli.config,
            args: cli.settings,
        };
        return tui_session(&rt, &loaded, source, cli.ui, &log);
    };
    init_logging(&settings.log_level, LogTo::Stderr(progress.clone()))?;
    match command {
        Command::Config {
            action: ConfigAction::Path,
        } => {
            println!("{}", loaded.file.display());
        }
        Command::Config {
            action: ConfigAction::Show,
        } => {
            let exists = if loaded.file_exists {
                ""
            } else {
                " (does not exist; defaults apply)"
            };
            println!("# settings file: {}{exists}", loaded.file.display());
            let w = loaded
                .entries
                .iter()
                .map(|e| e.key.len())
                .max()
                .unwrap_or(0);
            for e in &loaded.entries {
                println!("{:w$} = {:<50} # {}", e.key, e.value, e.source);
            }
        }
        Command::Models { action } => {
            let opts = settings.hub_options(hub::Progress::Stderr);
            // The local LLM only when it is the one describe would use.
            let roles = settings.roles(loaded.llm_is_local());
            let mut failed = 0;
            if matches!(action, Some(ModelsAction::Fetch)) {
                // Every model is tried, so one unreachable repo does not hide the others' state.
                for &role in &roles {
                    match rt.block_on(hub::resolve(role, settings.model(role), &opts)) {
                        Ok(m) => eprintln!("{}: ready", m.label()),
                        Err(e) => {
                            eprintln!("error: {e}");
                            failed += 1;
                        }
                    }
                }
            }
            print_models(&rt, settings, &opts, &roles);
            if failed > 0 {
                bail!("{failed} model(s) could not be fetched (see above)");
            }
        }
        Command::Bench(args) => bench_cmd(settings, args)?,
        Command::Layers => {
            let target = load_target(&rt, settings)?;
            println!("# {} — {}", target.name, target.net.info().architecture);
            // As wide as the longest name (torchvision's ViT layers are long).
            let w = target
                .layers()
                .iter()
                .map(|l| l.name.len())
                .max()
                .unwrap_or(0)
                .max(12);
            println!("{:<w$} {:>8}  {:<16} map", "layer", "neurons", "output");
            for l in target.layers() {
                let map = match l.kind {
                    LayerKind::Spatial => format!("{}x{}", l.shape[1], l.shape[2]),
                    LayerKind::Tokens { grid } => format!("CLS + {}x{} patches", grid.0, grid.1),
                    LayerKind::Vector => "-".into(),
                };
                println!(
                    "{:<w$} {:>8}  {:<16} {map}",
                    l.name,
                    l.neurons,
                    format!("{:?}", l.shape)
                );
            }
        }
        Command::Probe {
            action: ProbeAction::Check,
        } => {
            let probe = ProbeSet::open(&settings.probe)?;
            let bar = progress.add(images_bar(probe.len()));
            let cancel = ctrl_c_flag(&rt);
            let mut failed = Vec::new();
            let pre = dnd::probe::Preprocess::imagenet();
            dnd::probe::for_each_batch(&probe.images, &pre, settings.batch_size, &cancel, |b| {
                bar.inc((b.indices.len() + b.skipped.len()) as u64);
                failed.extend(b.skipped);
                Ok(())
            })?;
            bar.finish_and_clear();
            println!(
                "{}: {} images, fingerprint {}",
                probe.root.display(),
                probe.len(),
                probe.fingerprint
            );
            for (i, reason) in &failed {
                println!("skipped {}: {reason}", probe.images[*i].rel);
            }
            println!(
                "{} decoded, {} skipped",
                probe.len() - failed.len(),
                failed.len()
            );
        }
        Command::Probe {
            action:
                ProbeAction::Fetch {
                    dataset,
                    pattern,
                    shards,
                },
        } => {
            let opts = dnd::probe::fetch::FetchOptions {
                dataset,
                pattern,
                shards,
                dest: settings.probe.clone(),
                hub: settings.hub_options(hub::Progress::Stderr),
            };
            let n = rt.block_on(dnd::probe::fetch::fetch(&opts))?;
            let set = ProbeSet::open(&opts.dest)?;
            println!(
                "{}: {n} new images, {} in all",
                opts.dest.display(),
                set.len()
            );
        }
        Command::Activations(args) => activations_cmd(&rt, settings, &progress, args)?,
        Command::Describe(args) => {
            headless::describe(&rt, settings, loaded.llm_is_local(), &progress, args)?
        }
        Command::Export(args) => {
            // The target filters only when chosen explicitly: its default would hide what
            // was described with --target.
            let target_chosen = loaded
                .entries
                .iter()
                .any(|e| e.key == "target" && e.source != config::Source::Default);
            let target = target_chosen.then(|| settings.target.to_string());
            headless::export(settings, target.as_deref(), args)?
        }
    }
    Ok(())
}

fn activations_cmd(
    rt: &tokio::runtime::Runtime,
    settings: &Settings,
    progress: &MultiProgress,
    args: ActivationsArgs,
) -> Result<()> {
    let target = load_target(rt, settings)?;
    let mut layers: Vec<usize> = Vec::new();
    for name in &args.layer {
        let l = target.layer_index(name.trim())?;
        if !layers.contains(&l) {
            layers.push(l);
        }
    }
    if let Some(n) = args.neuron {
        for &l in &layers {
            target.check_neuron(l, n)?;
        }
    }
    let probe = ProbeSet::open(&settings.probe)?;
    let cache = ActivationCache::new(&settings.cache_dir);
    let bar = progress.add(images_bar(probe.len()));
    let cancel = ctrl_c_flag(rt);
    let started = std::time::Instant::now();
    let (all, report) = activations::extract(
        &target,
        &probe,
        &layers,
        activations::ExtractOptions {
            pool: args.pool,
            batch_size: settings.batch_size,
            cache: (!args.no_cache).then_some(&cache),
        },
        &mut |p| {
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
        },
        &cancel,
    )?;
    bar.finish_and_clear();

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for acts in &all {
        let neurons: Vec<usize> = match args.neuron {
            Some(n) => vec![n],
            None => (0..acts.neurons).collect(),
        };
        let tops = match args.neuron {
            Some(n) => vec![acts.top_k(n, args.top)],
            None => acts.top_k_all(args.top),
        };
        let li = target.layer_index(&acts.layer)?;
        if args.format == Format::Table {
            writeln!(
                out,
                "# {} {} ({} pooling), {} images",
                target.name,
                acts.layer,
                acts.pool,
                acts.images.len()
            )?;
            writeln!(
                out,
                "{:>6} {:>4} {:>12}  image",
                "neuron", "rank", "activation"
            )?;
        }
        for (&n, top) in neurons.iter().zip(&tops) {
            let maps = if args.maps {
                let paths: Vec<PathBuf> = top
                    .iter()
                    .map(|&(i, _)| probe.root.join(&acts.images[i]))
                    .collect();
                activations::neuron_maps(&target, li, n, &paths, settings.batch_size)?
            } else {
                Vec::new()
            };
            match args.format {
                Format::Json => {
                    let top_json: Vec<serde_json::Value> = top
                        .iter()
                        .enumerate()
                        .map(|(r, &(i, v))| {
                            let mut o =
                                serde_json::json!({"image": acts.images[i], "activation": v});
                            if let Some(m) = maps.get(r) {
                                let rows: Vec<&[f32]> = m.values.chunks(m.width).collect();
                                o["map"] = serde_json::json!(rows);
                            }
                            o
                        })
                        .collect();
                    let mut line = serde_json::json!({"neuron": n, "top": top_json});
                    if all.len() > 1 {
                        line["layer"] = serde_json::json!(acts.layer);
                    }
                    writeln!(out, "{line}")?;
                }
                Format::Table => {
                    for (r, &(i, v)) in top.iter().enumerate() {
                        writeln!(out, "{n:>6} {:>4} {v:>12.5}  {}", r + 1, acts.images[i])?;
                        if let Some(m) = maps.get(r) {
                            for row in m.values.chunks(m.width) {
                                let cells: Vec<String> =
                                    row.iter().map(|v| format!("{v:7.3}")).collect();
                                writeln!(out, "{:>24}{}", "", cells.join(" "))?;
                            }
                        }
                    }
                }
            }
        }
    }
    out.flush()?;
    drop(out);
    let cached = if report.cached.is_empty() {
        String::new()
    } else {
        format!(", from cache: {}", report.cached.join(", "))
    };
    eprintln!(
        "{} images, {} skipped{cached} ({:.1}s)",
        probe.len() - report.skipped.len(),
        report.skipped.len(),
        started.elapsed().as_secs_f64()
    );
    // Computed runs warned about each skipped file as it came; a cache hit names them here.
    if report.cached.len() == layers.len() {
        for (rel, reason) in &report.skipped {
            eprintln!("  skipped {rel}: {reason}");
        }
    }
    Ok(())
}

fn bench_cmd(s: &Settings, args: BenchArgs) -> Result<()> {
    let device = dnd::device::open(s.device)?;
    let dtype = dnd::device::dtype_for(s.dtype, &device)?;
    let opts = dnd::bench::Options {
        quick: args.quick,
        runs: args.runs,
        budget: std::time::Duration::from_secs_f64(args.budget.max(0.0)),
        only: args.only,
        neurons: args.neurons.unwrap_or(if args.quick { 2 } else { 64 }),
        llm_latency: std::time::Duration::from_secs_f64(args.llm_latency.max(0.0)),
        llm_concepts: args.llm_concepts,
        work: args.work.unwrap_or_else(|| s.cache_dir.join("bench")),
    };
    if args.check {
        return check_cmd(&device, dtype, &opts, args.json.as_deref());
    }
    eprintln!(
        "dnd bench on {} ({dtype:?}; {}; {} CPU threads){}: random weights, median of up to {} runs after a warm-up",
        dnd::device::describe(&device),
        dnd::device::kernels(&device, dtype),
        rayon::current_num_threads(),
        if opts.quick { ", quick sizes" } else { "" },
        opts.runs
    );
    let line = |r: &dnd::bench::Row| {
        let mem = r
            .peak_memory_bytes
            .map_or("-".into(), dnd::hub::human_bytes);
        format!(
            "{:<34} {:>10.2} {:<10} {:>9.4} s  {:>2} runs  peak {:>10}  {}",
            r.name, r.value, r.unit, r.seconds, r.runs, mem, r.note
        )
    };
    // The JSON is rewritten after every row, so a run cut short keeps what it measured.
    let write = |report: &dnd::bench::Report| -> Result<()> {
        if let Some(path) = &args.json {
            let text = serde_json::to_string_pretty(report).context("bench report to JSON")?;
            std::fs::write(path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    };
    let mut so_far = dnd::bench::Report::new(&device, dtype, opts.quick);
    let report = dnd::bench::run(&device, dtype, &opts, &mut |r| {
        eprintln!("{}", line(r));
        so_far.rows.push(r.clone());
        if let Err(e) = write(&so_far) {
            eprintln!("warning: {e:#}");
        }
    })?;
    println!(
        "{:<34} {:>10} {:<10} {:>11}  {:>7}  {:>15}  note",
        "measurement", "value", "unit", "median", "", "memory"
    );
    for r in &report.rows {
        println!("{}", line(r));
    }
    write(&report)?;
    if let Some(path) = &args.json {
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn check_cmd(
    device: &candle_core::Device,
    dtype: candle_core::DType,
    opts: &dnd::bench::Options,
    json: Option<&std::path::Path>,
) -> Result<()> {
    eprintln!(
        "dnd bench --check on {} ({dtype:?}; {}): relative error ||device - reference|| / ||reference||",
        dnd::device::describe(device),
        dnd::device::kernels(device, dtype),
    );
    // The JSON is rewritten after every check, so a run that dies on the device (a kernel's
    // fault can take the process down) still shows which checks came before.
    let write = |checks: &[dnd::bench::check::Check]| -> Result<()> {
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(checks).context("checks to JSON")?;
            std::fs::write(path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    };
    let mut so_far = Vec::new();
    let checks = dnd::bench::check::run(device, dtype, opts, &mut |c| {
        let kernel = c.kernel.map_or(String::new(), |k| format!(" [{k}]"));
        eprintln!(
            "{:<38} {:>10.2e}  tolerance {:.0e}  {:<4}  {}{kernel}",
            c.name,
            c.error,
            c.tolerance,
            if c.passed() { "ok" } else { "FAIL" },
            c.note
        );
        so_far.push(c.clone());
        if let Err(e) = write(&so_far) {
            eprintln!("warning: {e:#}");
        }
    })?;
    write(&checks)?;
    if let Some(path) = json {
        eprintln!("wrote {}", path.display());
    }
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.name.as_str())
        .collect();
    if !failed.is_empty() {
        // The first failing check of one kernel family names what to turn off (a fault on
        // the device can fail every check after it).
        let hint = checks
            .iter()
            .find(|c| !c.passed())
            .and_then(|c| c.kernel)
            .map_or(String::new(), |k| {
                format!(" To run without that kernel family, set DND_GPU_KERNELS_OFF={k}.")
            });
        bail!(
            "{} of {} checks failed: {}. The device computes something else than the CPU; \
             please report it with this output.{hint}",
            failed.len(),
            checks.len(),
            failed.join(", ")
        );
    }
    println!("all {} checks passed", checks.len());
    Ok(())
}

fn load_target(rt: &tokio::runtime::Runtime, s: &Settings) -> Result<Target> {
    let model = rt.block_on(hub::resolve(
        Role::Target,
        &s.target,
        &s.hub_options(hub::Progress::Stderr),
    ))?;
    let device = dnd::device::open(s.device)?;
    let dtype = dnd::device::dtype_for(s.dtype, &device)?;
    tracing::info!(
        "target {} on {} ({dtype:?})",
        model.label(),
        dnd::device::describe(&device)
    );
    Ok(Target::load(&model, &device, dtype)?)
}

fn print_models(rt: &tokio::runtime::Runtime, s: &Settings, opts: &HubOptions, roles: &[Role]) {
    println!("{:<12} {:<48} {:<22} size", "model", "source", "status");
    for &role in roles {
        let st = rt.block_on(hub::status(role, s.model(role), opts));
        let status = if st.missing.is_empty() {
            "on disk".to_string()
        } else {
            format!("missing {} file(s)", st.missing.len())
        };
        let size = st.size(opts.offline);
        println!(
            "{:<12} {:<48} {status:<22} {size}",
            role.setting(),
            st.source.to_string()
        );
        if !st.missing.is_empty() {
            println!("{:<12} needs: {}", "", st.missing.join(", "));
        }
    }
    if roles
        .iter()
        .any(|&r| matches!(s.model(r), hub::ModelSource::Hub { .. }))
    {
        println!("(Hub models live in the Hugging Face cache: $HF_HOME/hub, default ~/.cache/huggingface/hub; `dnd models fetch` downloads what is missing)");
    }
}

pub(crate) fn images_bar(total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images  {per_sec}  ETA {eta}")
            .expect("valid template"),
    );
    bar
}

/// First Ctrl-C: stop after the current batch (nothing partial is written). Second: exit now.
pub(crate) fn ctrl_c_flag(rt: &tokio::runtime::Runtime) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    rt.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ndnd: stopping after the current batch (Ctrl-C again to quit at once)");
            f.store(true, Ordering::SeqCst);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    flag
}

/// Logs go to stderr, drawn around any progress bar so neither garbles the other.
/// Where log lines go.
enum LogTo {
    /// Drawn around any progress bar so neither garbles the other.
    Stderr(MultiProgress),
    /// Appended to a file (while the terminal UI owns the screen).
    File(PathBuf),
}

fn init_logging(level: &str, to: LogTo) -> Result<()> {
    if !["error", "warn", "info", "debug", "trace"].contains(&level) {
        bail!("log level {level:?}: use error, warn, info, debug or trace");
    }
    // Our own messages at the chosen level; other crates' only when they warn.
    let filter = tracing_subscriber::EnvFilter::try_new(format!("dnd={level},warn"))
        .context("cannot set up logging")?;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match to {
        LogTo::Stderr(progress) => fmt
            .without_time()
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .with_writer(move || ProgressWriter(progress.clone()))
            .init(),
        LogTo::File(path) => {
            let dir = path.parent().unwrap_or(std::path::Path::new("."));
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the log folder {}", dir.display()))?;
            let name = path.file_name().unwrap_or_default().to_owned();
            fmt.with_ansi(false)
                .with_writer(tracing_appender::rolling::never(dir, name))
                .init()
        }
    }
    Ok(())
}

/// `dnd` with no subcommand: models load (with a spinner on the plain terminal), then the UI
/// takes the screen.
fn tui_session(
    rt: &tokio::runtime::Runtime,
    loaded: &config::Loaded,
    source: dnd::tui::SettingsSource,
    ui: UiArgs,
    log: &std::path::Path,
) -> Result<()> {
    let theme = dnd::tui::theme::Theme::load(
        &loaded.settings.theme,
        std::env::var_os("NO_COLOR").is_some(),
    )
    .map_err(anyhow::Error::msg)?;
    // The terminal is asked about graphics before the UI reads its keys.
    let thumbs = dnd::tui::images::Thumbs::new(dnd::tui::images::Thumbs::picker(ui.images));
    let session = dnd::tui::Session::new(
        source,
        rt.handle().clone(),
        theme,
        thumbs,
        dnd::tui::AfterLoad::Open {
            layer: ui.layer,
            neuron: ui.neuron,
        },
    )?;
    tracing::info!("terminal UI started; log at {}", log.display());
    rt.block_on(session.run())?;
    Ok(())
}

struct ProgressWriter(MultiProgress);

impl Write for ProgressWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
