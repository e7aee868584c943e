//! The pipeline core as the TUI will drive it: typed events in order, the LLM work of one
//! wave overlapping the model work of the next, and cancellation between batches.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use common::llm::MockLlm;
use common::{fixtures, resolve_fixture};
use dnd::config::{Decoder, Secret};
use dnd::hub::Role;
use dnd::pipeline::{self, Context, Event, Job, Models, Params, Stage};
use dnd::probe::ProbeSet;
use dnd::store::Store;
use dnd::summarise::{ApiLlm, ApiOptions, Llm};

fn models() -> Models {
    let resolved = [
        resolve_fixture(Role::Target, "resnet_basic"),
        resolve_fixture(Role::Captioner, "blip_tiny"),
        resolve_fixture(Role::Synthesiser, "sd_tiny"),
        resolve_fixture(Role::Clip, "clip_tiny"),
    ];
    Models::load(
        &resolved,
        None,
        Decoder::Vae,
        "mock",
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
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
    mut on_event: impl FnMut(&Event),
) -> (dnd::Result<pipeline::Summary>, Arc<Store>) {
    let mock = MockLlm::start(&[], None, delay);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("dnd.sqlite")).unwrap());
    let models = models();
    let probe = ProbeSet::open(&fixtures().join("images")).unwrap();
    let llm = llm(mock.url());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        layer: "layer4".into(),
        neurons,
        params: params(),
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
    (result, store)
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

#[test]
fn the_engine_runs_submitted_jobs_and_cancels_on_request() {
    use dnd::engine::{Engine, Resources};
    let mock = MockLlm::start(&[], None, Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("dnd.sqlite")).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let engine = Engine::start(
        Resources {
            models: models(),
            probe: ProbeSet::open(&fixtures().join("images")).unwrap(),
            store: store.clone(),
            llm: llm(mock.url()),
            cache: None,
            runtime: rt.handle().clone(),
        },
        tx,
    );
    let job = |neurons: Vec<usize>| Job {
        layer: "layer4".into(),
        neurons,
        params: params(),
        force: false,
    };
    let finished = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>| loop {
        match rx.blocking_recv().expect("the engine reports") {
            Event::JobFinished(r) => return r,
            _ => continue,
        }
    };
    engine.submit(job(vec![2]));
    assert_eq!(finished(&mut rx).unwrap().described, vec![2]);
    // The models stay loaded: a second job runs on the same engine, and can be cancelled.
    engine.submit(job(vec![0, 1, 3]));
    loop {
        if let Event::StageStarted {
            stage: Stage::Concepts,
            ..
        } = rx.blocking_recv().unwrap()
        {
            engine.cancel();
            break;
        }
    }
    assert_eq!(finished(&mut rx).unwrap_err(), "cancelled");
    assert_eq!(store.rows(None, None).unwrap().len(), 1);
    drop(engine);
}
