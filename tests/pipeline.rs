//! The pipeline core as the TUI will drive it: typed events in order, the LLM work of one
//! wave overlapping the model work of the next, and cancellation between batches.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use common::llm::MockLlm;
use common::{fixtures, resolve_fixture};
use dnd::config::{Decoder, Secret};
use dnd::hub::Role;
use dnd::pipeline::{self, Context, Description, Event, Job, Models, Params, Stage};
use dnd::probe::ProbeSet;
use dnd::store::Store;
use dnd::summarise::{ApiLlm, ApiOptions, Llm};

fn models(decoder: Decoder) -> Models {
    let resolved = [
        resolve_fixture(Role::Target, "resnet_basic"),
        resolve_fixture(Role::Captioner, "blip_tiny"),
        resolve_fixture(Role::Synthesiser, "sd_tiny"),
        resolve_fixture(Role::Clip, "clip_tiny"),
    ];
    let tiny = resolve_fixture(Role::TinyVae, "taesd_tiny");
    let tiny = Some(&tiny).filter(|_| decoder != Decoder::Vae);
    Models::load(&resolved, tiny, decoder, "mock", &Device::Cpu, DType::F32).unwrap()
}

fn params() -> Params {
    let loaded = dnd::config::load_with_env(None, &Default::default(), &|_| None).unwrap();
    let mut s = loaded.settings;
    s.top_k = 2;
    s.top_images = 3;
    s.candidates = 2;
    s.images_per_concept = 2;
    s.caption_tokens = 6;
    s.wave = 1;
    Params::from_settings(&s, dnd::activations::Pool::Mean).unwrap()
}

fn llm(url: String) -> Arc<dyn Llm> {
    Arc::new(
        ApiLlm::new(ApiOptions {
            url,
            model: "mock".into(),
            api_key: Secret::default(),
            timeout: Duration::from_secs(5),
            retries: 0,
            backoff: Duration::ZERO,
            concurrency: 4,
        })
        .unwrap(),
    )
}

/// Runs `neurons` of layer4, handing each event to `on_event` as it arrives.
fn run(
    neurons: Vec<usize>,
    delay: Duration,
    cancel: &AtomicBool,
    on_event: impl FnMut(&Event),
) -> (dnd::Result<pipeline::Summary>, Arc<Store>) {
    let (r, store, _) = run_with(params(), Decoder::Vae, neurons, delay, cancel, on_event);
    (r, store)
}

/// `run` with these parameters and decoder, also returning the store's folder (its images go
/// with it).
fn run_with(
    params: Params,
    decoder: Decoder,
    neurons: Vec<usize>,
    delay: Duration,
    cancel: &AtomicBool,
    mut on_event: impl FnMut(&Event),
) -> (
    dnd::Result<pipeline::Summary>,
    Arc<Store>,
    tempfile::TempDir,
) {
    let mock = MockLlm::start(&[], None, delay);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("dnd.sqlite")).unwrap());
    let models = models(decoder);
    let probe = ProbeSet::open(&fixtures().join("images")).unwrap();
    let llm = llm(mock.url());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        layer: "layer4".into(),
        neurons,
        params,
        force: false,
    };
    let result = std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let ctx = Context {
                models: &models,
                probe: &probe,
                store: &store,
                llm: &llm,
                cache: None,
                runtime: rt.handle(),
                events: &tx,
                cancel,
            };
            let r = pipeline::run(&ctx, &job);
            drop(tx);
            r
        });
        while let Some(e) = rx.blocking_recv() {
            on_event(&e);
        }
        worker.join().unwrap()
    });
    (result, store, dir)
}

#[test]
fn llm_of_one_wave_overlaps_model_work_of_the_next() {
    let cancel = AtomicBool::new(false);
    let mut log = Vec::new();
    let (r, store) = run(vec![0, 1, 2], Duration::from_millis(100), &cancel, |e| {
        log.push(e.clone())
    });
    let summary = r.unwrap();
    assert_eq!(summary.described, vec![0, 1, 2]);
    assert_eq!(store.rows(None, None).unwrap().len(), 3);
    let pos = |f: &dyn Fn(&Event) -> bool| log.iter().position(f).unwrap();
    let concepts_0_done = pos(&|e| {
        matches!(
            e,
            Event::StageFinished {
                neuron: 0,
                stage: Stage::Concepts,
                ..
            }
        )
    });
    let captions_1_started = pos(&|e| {
        matches!(
            e,
            Event::StageStarted {
                neuron: 1,
                stage: Stage::Captions
            }
        )
    });
    assert!(
        captions_1_started < concepts_0_done,
        "neuron 1's captions should run while neuron 0 waits for the LLM"
    );
    // Each neuron's events come in stage order and end with Finished.
    for n in 0..3 {
        let stages: Vec<Stage> = log
            .iter()
            .filter_map(|e| match e {
                Event::StageStarted { neuron, stage } if *neuron == n => Some(*stage),
                _ => None,
            })
            .collect();
        assert_eq!(
            stages,
            vec![
                Stage::Activations,
                Stage::Crops,
                Stage::Captions,
                Stage::Concepts,
                Stage::Synthesis,
                Stage::Scoring
            ]
        );
        let fin = pos(&|e| matches!(e, Event::Finished { neuron, .. } if *neuron == n));
        let scores = pos(&|e| matches!(e, Event::Scores { neuron, .. } if *neuron == n));
        assert!(scores < fin);
    }
}

#[test]
fn a_slow_llm_is_hidden_behind_more_waves_of_model_work() {
    // Each answer takes 0.8 s and a neuron's concepts take two rounds of calls: far longer
    // than the tiny models' stage A. So the models prepare the next waves (up to three waiting)
    // before the first wave's answers are in.
    let cancel = AtomicBool::new(false);
    let mut log = Vec::new();
    let (r, _) = run(vec![0, 1, 2, 3], Duration::from_millis(800), &cancel, |e| {
        log.push(e.clone())
    });
    assert_eq!(r.unwrap().described, vec![0, 1, 2, 3]);
    let pos = |f: &dyn Fn(&Event) -> bool| log.iter().position(f).unwrap();
    let started = |n: usize, s: Stage| {
        pos(&|e| matches!(e, Event::StageStarted { neuron, stage } if *neuron == n && *stage == s))
    };
    let finished = |n: usize| pos(&|e| matches!(e, Event::Finished { neuron, .. } if *neuron == n));
    assert!(
        started(2, Stage::Captions) < finished(0),
        "neuron 2's captions should run while neuron 0 waits for the LLM"
    );
    // Three waves at most wait for answers: the fourth's stage A comes after the first is done.
    assert!(started(3, Stage::Crops) > finished(0));
    // Waves still finish in order.
    assert!(finished(0) < finished(1) && finished(1) < finished(2) && finished(2) < finished(3));
}

/// Each stored neuron's description.
fn descriptions(store: &Store) -> Vec<Description> {
    let rows = store.rows(None, None).unwrap();
    let of = |r: dnd::store::Row| serde_json::from_value(r.record).unwrap();
    rows.into_iter().map(of).collect()
}

#[test]
fn a_concept_made_earlier_in_the_run_is_copied_rather_than_generated_again() {
    // The mock LLM answers from a handful of concepts, so the neurons share candidates: with
    // one neuron a wave the repeats are recalled from earlier waves' files, with four from
    // the same wave. With `--decoder hybrid` the copies also carry the latents the VAE decodes
    // again for each neuron's CLIP top.
    let cancel = AtomicBool::new(false);
    let neurons = vec![0, 1, 2, 3];
    let q = params().images_per_concept;
    let mut vae_compared = 0;
    for (wave, decoder) in [
        (1, Decoder::Vae),
        (4, Decoder::Vae),
        (1, Decoder::Hybrid),
        (4, Decoder::Hybrid),
    ] {
        let mut p = params();
        p.batches.neurons = wave;
        let (r, store, _dir) =
            run_with(p, decoder, neurons.clone(), Duration::ZERO, &cancel, |_| {});
        let summary = r.unwrap();
        assert_eq!(summary.described, neurons);
        let described = descriptions(&store);
        let mut by_concept: HashMap<String, Vec<Vec<image::RgbImage>>> = HashMap::new();
        let mut files = HashSet::new();
        for d in &described {
            for set in &d.synthetic {
                assert_eq!(set.files.len(), q);
                let images = set.files.iter().map(|f| {
                    assert!(files.insert(f.clone()), "{f} is listed twice");
                    image::open(store.images_root().join(f))
                        .unwrap()
                        .into_rgb8()
                });
                let images = images.collect();
                by_concept
                    .entry(set.concept.clone())
                    .or_default()
                    .push(images);
            }
        }
        let sets: usize = by_concept.values().map(Vec::len).sum();
        assert!(
            sets > by_concept.len(),
            "no concept repeats: {by_concept:?}"
        );
        assert_eq!(summary.images_made, by_concept.len() * q);
        assert_eq!(summary.images_reused, (sets - by_concept.len()) * q);
        for (concept, sets) in &by_concept {
            assert!(
                sets.iter().all(|s| s == &sets[0]),
                "{concept}: images differ"
            );
        }
        // And the copies are what each neuron makes on its own, but for rounding: an image's
        // batch companions change the float order of some sums, so a value may land one
        // level off.
        // Two images within a level of each other in all but 0.1% of their values.
        let close = |a: &Path, b: &Path| {
            let ia = image::open(a).unwrap().into_rgb8().into_raw();
            let ib = image::open(b).unwrap().into_rgb8().into_raw();
            let pairs = ia.iter().zip(ib);
            let off: Vec<u8> = pairs
                .map(|(x, y)| x.abs_diff(y))
                .filter(|&d| d > 0)
                .collect();
            assert!(
                off.iter().all(|&d| d == 1) && off.len() * 1000 < ia.len(),
                "{}: {} values differ from the neuron's own, by up to {:?}",
                b.display(),
                off.len(),
                off.iter().max()
            );
        };
        // The neurons share top images, which the job captions once: each neuron's captions
        // are still those it gets alone (below).
        let tops: Vec<_> = described
            .iter()
            .flat_map(|d| &d.top_images)
            .map(|t| (&t.image, t.crop.as_ref().map(|c| c.bbox)))
            .collect();
        assert!(tops.iter().collect::<HashSet<_>>().len() < tops.len());
        for d in &described {
            let alone = run_with(
                params(),
                decoder,
                vec![d.neuron],
                Duration::ZERO,
                &cancel,
                |_| {},
            );
            let (r, alone, _dir) = alone;
            assert_eq!(r.unwrap().images_reused, 0);
            let root = alone.images_root().to_path_buf();
            let alone = descriptions(&alone).remove(0);
            assert_eq!(alone.captions, d.captions);
            assert_eq!(alone.synthetic.len(), d.synthetic.len());
            for (a, b) in alone.synthetic.iter().zip(&d.synthetic) {
                assert_eq!(a.concept, b.concept);
                for (x, y) in a.activations.iter().zip(&b.activations) {
                    let n = d.neuron;
                    assert!((x - y).abs() <= 1e-3 * x.abs().max(1.0), "{n}: {x} vs {y}");
                }
                for (fa, fb) in a.files.iter().zip(&b.files) {
                    close(&root.join(fa), &store.images_root().join(fb));
                }
                // The VAE's decodes come from the latents the copy carried.
                for (i, fb) in &b.vae_files {
                    if let Some(fa) = a.vae_files.get(i) {
                        close(&root.join(fa), &store.images_root().join(fb));
                        vae_compared += 1;
                    }
                }
            }
        }
    }
    assert!(vae_compared > 0, "no VAE decode compared");
}

#[test]
fn cancelling_stops_between_batches_and_keeps_finished_neurons() {
    let cancel = AtomicBool::new(false);
    let (r, store) = run(vec![0, 1, 2, 3], Duration::from_millis(200), &cancel, |e| {
        if matches!(e, Event::Finished { .. }) {
            cancel.store(true, Ordering::SeqCst);
        }
    });
    assert!(matches!(r, Err(dnd::Error::Cancelled)), "{r:?}");
    let rows = store.rows(None, None).unwrap();
    assert!(!rows.is_empty() && rows.len() < 4, "{} stored", rows.len());
}

/// An engine on the fixture models, as the terminal UI runs one, with its store and LLM.
struct Rig {
    engine: dnd::engine::Engine,
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
    _mock: MockLlm,
    _rt: tokio::runtime::Runtime,
}

impl Rig {
    fn start(llm_delay: Duration) -> Self {
        use dnd::engine::{Engine, Resources};
        let mock = MockLlm::start(&[], None, llm_delay);
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("dnd.sqlite")).unwrap());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let engine = Engine::start(
            Resources {
                models: models(Decoder::Vae),
                probe: ProbeSet::open(&fixtures().join("images")).unwrap(),
                store: store.clone(),
                llm: llm(mock.url()),
                cache: None,
                runtime: rt.handle().clone(),
            },
            tx,
        );
        Self {
            engine,
            rx,
            store,
            _dir: dir,
            _mock: mock,
            _rt: rt,
        }
    }

    fn submit(&self, neurons: Vec<usize>, force: bool) {
        self.engine.submit(Job {
            layer: "layer4".into(),
            neurons,
            params: params(),
            force,
        });
    }

    /// The outcome of the running job.
    fn finished(&mut self) -> Result<pipeline::Summary, String> {
        loop {
            if let Event::JobFinished(r) = self.rx.blocking_recv().expect("the engine reports") {
                return r;
            }
        }
    }
}

#[test]
fn the_engine_runs_submitted_jobs_and_cancels_on_request() {
    let mut rig = Rig::start(Duration::from_millis(300));
    rig.submit(vec![2], false);
    assert_eq!(rig.finished().unwrap().described, vec![2]);
    // The models stay loaded: a second job runs on the same engine, and can be cancelled.
    rig.submit(vec![0, 1, 3], false);
    loop {
        if let Event::StageStarted {
            stage: Stage::Concepts,
            ..
        } = rig.rx.blocking_recv().unwrap()
        {
            rig.engine.cancel();
            break;
        }
    }
    assert_eq!(rig.finished().unwrap_err(), "cancelled");
    assert_eq!(rig.store.rows(None, None).unwrap().len(), 1);
}

#[test]
fn the_engine_copies_a_concept_an_earlier_job_made_unless_its_files_changed() {
    // One neuron a job, as the terminal UI asks: the second job's concepts made by the first
    // are copied from its files.
    let mut rig = Rig::start(Duration::ZERO);
    let q = params().images_per_concept;
    let sets = |store: &Store, n: usize| -> Vec<(String, Vec<Vec<u8>>)> {
        let d = descriptions(store)
            .into_iter()
            .find(|d| d.neuron == n)
            .unwrap();
        let root = store.images_root();
        let pixels = |f: &String| image::open(root.join(f)).unwrap().into_rgb8().into_raw();
        let of = |s: &dnd::pipeline::SyntheticSet| {
            (s.concept.clone(), s.files.iter().map(pixels).collect())
        };
        d.synthetic.iter().map(of).collect()
    };
    rig.submit(vec![0], false);
    rig.finished().unwrap();
    let first: HashMap<String, Vec<Vec<u8>>> = sets(&rig.store, 0).into_iter().collect();
    rig.submit(vec![1], false);
    let summary = rig.finished().unwrap();
    let second = sets(&rig.store, 1);
    let shared: Vec<_> = second
        .iter()
        .filter(|(c, _)| first.contains_key(c))
        .collect();
    assert!(!shared.is_empty(), "neurons 0 and 1 share no concept");
    assert_eq!(summary.images_reused, shared.len() * q);
    assert_eq!(summary.images_made, (second.len() - shared.len()) * q);
    for (concept, images) in shared {
        assert!(&first[concept] == images, "{concept}: the copies differ");
    }

    // Every synthetic file written again since (as when its neuron is described again): the
    // next job makes its images rather than copying what the files now hold.
    let root = rig.store.images_root().to_path_buf();
    for d in descriptions(&rig.store) {
        for f in d.synthetic.iter().flat_map(|s| &s.files) {
            let img = image::open(root.join(f)).unwrap();
            image::RgbImage::new(img.width(), img.height())
                .save(root.join(f))
                .unwrap();
        }
    }
    rig.submit(vec![0], true);
    let summary = rig.finished().unwrap();
    assert_eq!(summary.images_reused, 0);
    assert_eq!(summary.images_made, first.len() * q);
    for (concept, images) in sets(&rig.store, 0) {
        assert!(first[&concept] == images, "{concept}: not made again");
    }
}
