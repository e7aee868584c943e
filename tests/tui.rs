//! Snapshot tests of every screen of the terminal UI in scripted states (ratatui's
//! TestBackend, images off so the text is deterministic). `cargo insta review` after a
//! deliberate change.

use std::path::Path;

use dnd::config::Preset;
use dnd::pipeline::{
    CandidateScore, CropRef, Description, Event, Label, ModelId, ModelIds, Stage, TopImage,
};
use dnd::store::{Row, Status};
use dnd::tui::app::{Action, App, Effect, LayerRow, Rerun};
use dnd::tui::images::Thumbs;
use dnd::tui::theme::Theme;
use dnd::tui::ui::{draw, Roots};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

fn app() -> App {
    let layers = vec![
        LayerRow::new("layer3", 32, &[]),
        LayerRow {
            described: 2,
            failed: 1,
            accepted: 1,
            ..LayerRow::new("layer4", 6, &[])
        },
        LayerRow::new("fc", 10, &[]),
    ];
    App::new("timm/resnet50.tv_in1k".into(), layers, fast())
}

fn fast() -> Rerun {
    Rerun {
        preset: Preset::Fast,
        candidates: 5,
        steps: 1,
        seed: 0,
    }
}

fn row(neuron: usize, status: Status, label: Option<&str>) -> Row {
    Row {
        target: "timm/resnet50.tv_in1k".into(),
        layer: "layer4".into(),
        neuron,
        settings_key: "k".into(),
        status,
        label: label.map(String::from),
        record: serde_json::Value::Null,
        error: None,
        review: Default::default(),
        curated_label: None,
    }
}

fn in_layer4() -> App {
    let mut a = app();
    a.layer_sel = 1;
    a.update(Action::Open);
    let rows = [
        row(0, Status::Described, Some("striped fabric")),
        row(2, Status::Failed, None),
        row(4, Status::Described, Some("red cars")),
    ];
    a.set_neurons("layer4", 6, &rows);
    a
}

fn render(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    let mut thumbs = Thumbs::new(None);
    let roots = Roots {
        probe: Path::new("/probe"),
        store: Path::new("/store"),
    };
    t.draw(|f| {
        draw(f, app, &Theme::plain(), &mut thumbs, &roots);
    })
    .unwrap();
    t.backend().to_string()
}

fn description(neuron: usize) -> Description {
    let id = |s: &str| ModelId {
        source: s.into(),
        revision: None,
    };
    Description {
        target: "timm/resnet50.tv_in1k".into(),
        layer: "layer4".into(),
        neuron,
        status: Status::Described,
        labels: vec![
            Label {
                label: "striped fabric".into(),
                score: 2.61,
            },
            Label {
                label: "zebra".into(),
                score: 1.2,
            },
        ],
        candidates: vec![
            CandidateScore {
                concept: "striped fabric".into(),
                rank_score: 4.0,
                weight: 0.87,
                final_score: 2.61,
            },
            CandidateScore {
                concept: "zebra".into(),
                rank_score: 9.5,
                weight: 0.6,
                final_score: 1.2,
            },
        ],
        top_images: Vec::new(),
        crops: Vec::new(),
        captions: vec!["a striped shirt".into(), "a zebra in a field".into()],
        simplified: vec![Some("striped shirt".into()), Some("zebra".into())],
        synthetic: Vec::new(),
        timings: Stage::ALL
            .iter()
            .map(|s| (s.name().to_string(), 0.5))
            .collect(),
        models: ModelIds {
            target: id("t"),
            captioner: id("c"),
            synthesiser: id("s"),
            clip: id("clip"),
            llm: "gpt".into(),
            tiny_vae: None,
            hybrid: false,
        },
        seed: 0,
        error: None,
        dropped: Vec::new(),
    }
}

/// The run view of neuron 1 after the events of a run up to the LLM's answers streaming.
fn mid_run() -> App {
    let mut a = in_layer4();
    a.neuron_sel = 1;
    a.update(Action::Open);
    for stage in [Stage::Activations, Stage::Crops, Stage::Captions] {
        a.on_event(Event::StageStarted { neuron: 1, stage });
        a.on_event(Event::StageFinished {
            neuron: 1,
            stage,
            seconds: 0.25,
        });
    }
    a.on_event(Event::TopImages {
        neuron: 1,
        images: vec![
            TopImage {
                image: "a.jpg".into(),
                crop: None,
                activation: 3.0,
            },
            TopImage {
                image: "b.jpg".into(),
                crop: Some(CropRef {
                    bbox: [0, 0, 10, 10],
                    file: "crops/00_0.png".into(),
                }),
                activation: 2.0,
            },
        ],
    });
    a.on_event(Event::Caption {
        neuron: 1,
        index: 0,
        text: "a striped shirt on a bed".into(),
    });
    a.on_event(Event::Caption {
        neuron: 1,
        index: 1,
        text: "a zebra in a field".into(),
    });
    a.on_event(Event::StageStarted {
        neuron: 1,
        stage: Stage::Concepts,
    });
    a.on_event(Event::Simplified {
        neuron: 1,
        index: 0,
        text: "striped shirt".into(),
    });
    a.on_event(Event::LlmText {
        neuron: 1,
        call: dnd::summarise::Call::Simplify(1),
        text: "zeb".into(),
    });
    a
}

/// The last events of neuron 1's run: scores, the stored description, the job's end.
fn finish(a: &mut App, d: Description) {
    if d.status == Status::Described {
        a.on_event(Event::Scores {
            neuron: 1,
            scores: d.candidates.clone(),
        });
    }
    a.on_event(Event::Finished {
        neuron: 1,
        description: Box::new(d),
    });
    a.on_event(Event::JobFinished(Ok(Default::default())));
}

#[test]
fn a_run_that_copied_images_says_so() {
    let mut a = in_layer4();
    a.on_event(Event::JobFinished(Ok(dnd::pipeline::Summary {
        described: vec![1],
        images_made: 10,
        images_reused: 20,
        ..Default::default()
    })));
    let notice = a.notice.clone().unwrap_or_default();
    assert!(
        notice.contains("20 of 30 synthetic images copied from those made before"),
        "{notice}"
    );
    // Nothing copied, nothing said.
    let mut b = in_layer4();
    b.on_event(Event::JobFinished(Ok(Default::default())));
    assert_eq!(b.notice, None);
}

#[test]
fn layers_screen() {
    insta::assert_snapshot!(render(&app(), 80, 24));
}

#[test]
fn neuron_list_with_statuses_and_a_filter() {
    let a = in_layer4();
    insta::assert_snapshot!("neurons", render(&a, 80, 24));
    let mut f = in_layer4();
    f.update(Action::StartFilter);
    for c in "red".chars() {
        f.update(Action::Type(c));
    }
    insta::assert_snapshot!("neurons_filtered", render(&f, 80, 24));
}

#[test]
fn run_view_mid_stream_and_finished() {
    let mut a = mid_run();
    assert!(a.busy);
    insta::assert_snapshot!("run_mid_stream", render(&a, 100, 30));
    a.on_event(Event::StageFinished {
        neuron: 1,
        stage: Stage::Concepts,
        seconds: 1.5,
    });
    a.on_event(Event::Candidates {
        neuron: 1,
        candidates: vec!["striped fabric".into(), "zebra".into()],
    });
    finish(&mut a, description(1));
    assert!(!a.busy);
    insta::assert_snapshot!("run_finished", render(&a, 100, 30));
    assert_eq!(a.neurons[1].label.as_deref(), Some("striped fabric"));
}

#[test]
fn a_failed_run_shows_the_error() {
    let mut a = mid_run();
    let mut d = description(1);
    d.status = Status::Failed;
    d.labels.clear();
    d.candidates.clear();
    d.error = Some("LLM endpoint http://localhost:8000/v1 is unreachable".into());
    finish(&mut a, d);
    insta::assert_snapshot!(render(&a, 100, 30));
}

#[test]
fn help_overlay_and_quit_confirmation() {
    let mut a = mid_run();
    a.update(Action::Help);
    insta::assert_snapshot!("help", render(&a, 80, 24));
    a.update(Action::Back);
    assert!(!a.help);
    assert!(
        a.update(Action::Quit).is_empty(),
        "asks first while a run is in flight"
    );
    insta::assert_snapshot!("confirm_quit", render(&a, 80, 24));
    assert!(a
        .update(Action::Quit)
        .contains(&dnd::tui::app::Effect::Quit));
}

#[test]
fn a_small_terminal_gets_a_message_not_a_panic() {
    insta::assert_snapshot!(render(&mid_run(), 60, 15));
    // Even tinier sizes draw something.
    render(&mid_run(), 1, 1);
}

#[test]
fn keys_jump_and_next_undescribed() {
    let mut a = in_layer4();
    a.update(Action::StartJump);
    a.update(Action::Type('4'));
    a.update(Action::Open);
    assert_eq!(a.neuron_sel, 4);
    a.update(Action::NextUndescribed);
    assert_eq!(a.neuron_sel, 5);
    a.update(Action::NextUndescribed);
    assert_eq!(a.neuron_sel, 1, "wraps around, skipping described neurons");
}

#[test]
fn curation_keys_ask_the_loop_to_store_decisions() {
    use dnd::store::{Curation, Review};
    let mut a = mid_run();
    assert!(
        a.update(Action::Accept).is_empty(),
        "nothing to curate mid-run"
    );
    finish(&mut a, description(1));
    assert_eq!(
        a.update(Action::Accept),
        vec![Effect::Curate {
            neuron: 1,
            decision: Curation::Accept
        }]
    );
    assert_eq!(
        a.update(Action::Choose(1)),
        vec![Effect::Curate {
            neuron: 1,
            decision: Curation::Edit("zebra".into())
        }]
    );
    a.update(Action::StartEdit);
    for _ in 0.."striped fabric".len() {
        a.update(Action::Erase);
    }
    for c in "zebra stripes".chars() {
        a.update(Action::Type(c));
    }
    insta::assert_snapshot!("editing_label", render(&a, 100, 30));
    assert_eq!(
        a.update(Action::Open),
        vec![Effect::Curate {
            neuron: 1,
            decision: Curation::Edit("zebra stripes".into())
        }]
    );
    // The stored row comes back: list and counts follow.
    let mut r = row(1, Status::Described, Some("striped fabric"));
    r.review = Review::Edited;
    r.curated_label = Some("zebra stripes".into());
    a.curated(&r);
    assert_eq!(a.neurons[1].label.as_deref(), Some("zebra stripes"));
    assert_eq!(a.layers[1].edited, 1);
    a.update(Action::Back);
    insta::assert_snapshot!("neurons_after_edit", render(&a, 80, 24));
}

#[test]
fn rerun_form_changes_preset_candidates_steps_seed() {
    let mut a = mid_run();
    finish(&mut a, description(1));
    assert!(a.update(Action::Rerun).is_empty(), "R opens the form");
    assert!(a.typing(), "the form takes digits");
    // The preset toggles; the loop answers with that preset's steps.
    assert_eq!(
        a.update(Action::Right),
        vec![Effect::PresetSteps(Preset::Paper)]
    );
    a.form.as_mut().unwrap().numbers[1] = "50".into();
    a.update(Action::Down);
    a.update(Action::Erase);
    a.update(Action::Type('3'));
    a.update(Action::Type('x'));
    a.update(Action::Down);
    a.update(Action::Down);
    a.update(Action::Erase);
    for c in "42".chars() {
        a.update(Action::Type(c));
    }
    insta::assert_snapshot!("rerun_form", render(&a, 100, 30));
    assert_eq!(
        a.update(Action::Open),
        vec![Effect::Rerun {
            neuron: 1,
            settings: Rerun {
                preset: Preset::Paper,
                candidates: 3,
                steps: 50,
                seed: 42,
            }
        }]
    );
    assert!(a.form.is_none());
    // Esc leaves the form without running; an empty number is refused.
    a.update(Action::Rerun);
    assert!(a.update(Action::Back).is_empty());
    assert!(a.form.is_none());
    a.update(Action::Rerun);
    a.update(Action::Down);
    a.update(Action::Erase);
    assert!(a.update(Action::Open).is_empty());
    assert!(a.notice.as_deref().unwrap().contains("numbers"));
}

#[test]
fn clicks_select_then_open_rows() {
    let mut a = app();
    assert!(a.update(Action::Click(2)).is_empty());
    assert_eq!(a.layer_sel, 2);
    assert_eq!(
        a.update(Action::Click(2)),
        vec![Effect::LoadLayer("fc".into())],
        "a click on the selected row opens it"
    );
    assert!(a.update(Action::Click(9)).is_empty(), "below the rows");
    assert_eq!(a.layer_sel, 2);
    let mut a = in_layer4();
    a.update(Action::Click(3));
    assert_eq!(a.neuron_sel, 3);
    assert_eq!(
        a.update(Action::Click(3)),
        vec![Effect::Describe {
            neuron: 3,
            force: false
        }]
    );
}

#[test]
fn targets_screen_lists_stored_targets_and_switches() {
    let mut a = app();
    a.loaded(
        "timm/resnet50.tv_in1k".into(),
        a.layers.clone(),
        &[
            ("timm/resnet50.tv_in1k".into(), 2),
            ("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k".into(), 12),
        ],
    );
    assert_eq!(a.screen, dnd::tui::app::Screen::Layers);
    a.update(Action::Back);
    assert_eq!(a.screen, dnd::tui::app::Screen::Targets);
    insta::assert_snapshot!("targets", render(&a, 90, 24));
    assert!(a.update(Action::Open).is_empty(), "the loaded one opens");
    assert_eq!(a.screen, dnd::tui::app::Screen::Layers);
    a.update(Action::Back);
    a.update(Action::Down);
    assert_eq!(
        a.update(Action::Open),
        vec![Effect::SwitchTarget(
            "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k".into()
        )]
    );
}

mod setup {
    use super::*;
    use dnd::hub::{ModelSource, ModelStatus, Role};
    use dnd::tui::app::{LlmView, Phase, Setup};

    fn status(
        role: Role,
        repo: &str,
        missing: &[&'static str],
        remote: Option<u64>,
    ) -> ModelStatus {
        ModelStatus {
            role,
            source: ModelSource::hub(repo),
            missing: missing.iter().map(|m| m.to_string()).collect(),
            local_bytes: if missing.is_empty() { 102_760_448 } else { 0 },
            remote_bytes: remote,
        }
    }

    fn first_run(offline: bool, remote: Option<u64>) -> App {
        let mut a = App::new("timm/resnet50.tv_in1k".into(), Vec::new(), fast());
        a.set_up(Setup {
            models: vec![
                status(Role::Target, "timm/resnet50.tv_in1k", &[], None),
                status(
                    Role::Captioner,
                    "Salesforce/blip-image-captioning-large",
                    &["model.safetensors"],
                    remote,
                ),
                status(
                    Role::Synthesiser,
                    "stabilityai/sd-turbo",
                    &["unet/diffusion_pytorch_model.safetensors"],
                    remote,
                ),
                status(Role::Clip, "openai/clip-vit-base-patch16", &[], None),
            ],
            sizes_known: true,
            offline,
            llm: LlmView {
                local: false,
                url: "https://api.openai.com/v1".into(),
                model: "gpt-4o-mini".into(),
                key_set: false,
                local_model: "Qwen/Qwen2.5-1.5B-Instruct".into(),
                problem: Some("setting llm_api_key: the LLM endpoint is https://api.openai.com/v1 but no API key is set.\n  fix: export OPENAI_API_KEY=...".into()),
            },
            phase: Phase::Waiting,
            settings_file: "/home/me/.config/dnd/config.toml".into(),
        });
        a
    }

    #[test]
    fn missing_models_sizes_and_llm_settings() {
        let mut a = first_run(false, Some(1_879_048_192));
        insta::assert_snapshot!("setup_missing", render(&a, 110, 32));
        assert_eq!(a.update(Action::Download), vec![Effect::Download]);
        assert_eq!(a.update(Action::Open), vec![Effect::Recheck]);
        assert_eq!(
            a.update(Action::ToggleLocalLlm),
            vec![Effect::SetLlm {
                local: Some(true),
                url: None,
                model: None
            }]
        );
        a.update(Action::EditLlmUrl);
        for _ in 0.."https://api.openai.com/v1".len() {
            a.update(Action::Erase);
        }
        for c in "http://gpu-box:8000/v1".chars() {
            a.update(Action::Type(c));
        }
        assert_eq!(
            a.update(Action::Open),
            vec![Effect::SetLlm {
                local: None,
                url: Some("http://gpu-box:8000/v1".into()),
                model: None
            }]
        );
        a.setup.as_mut().unwrap().phase = Phase::Downloading {
            file: "model.safetensors".into(),
            done: 471_859_200,
            total: 1_879_048_192,
        };
        insta::assert_snapshot!("setup_downloading", render(&a, 110, 32));
        assert!(
            a.update(Action::Download).is_empty(),
            "one download at a time"
        );
    }

    #[test]
    fn offline_and_unreachable_say_so_and_show_local_folders() {
        let mut a = first_run(true, None);
        insta::assert_snapshot!("setup_offline", render(&a, 110, 32));
        assert!(a.update(Action::Download).is_empty());
        assert!(a.notice.as_deref().unwrap().contains("offline"));
        let mut a = first_run(false, None);
        let screen = render(&a, 110, 32);
        assert!(screen.contains("cannot be reached"), "{screen}");
        a.setup.as_mut().unwrap().phase = Phase::Failed(
            "captioner (org/blip): model.safetensors does not match what dnd expects: no key text_decoder.bert.embeddings.word_embeddings.weight.\n  fix: use a BLIP captioning checkpoint".into(),
        );
        let screen = render(&a, 110, 32);
        assert!(screen.contains("does not match"), "{screen}");
        assert!(
            screen.contains("fix: use a BLIP captioning checkpoint"),
            "{screen}"
        );
        assert_eq!(
            a.update(Action::Download),
            vec![Effect::Download],
            "d tries again"
        );
        assert!(
            screen.contains("dnd --captioner /path/to/folder"),
            "{screen}"
        );
    }
}

#[test]
fn running_stages_show_their_progress() {
    let mut a = in_layer4();
    a.neuron_sel = 1;
    a.update(Action::Open);
    a.on_event(Event::StageStarted {
        neuron: 1,
        stage: Stage::Activations,
    });
    a.on_event(Event::Activations {
        done: 640,
        total: 3100,
    });
    let screen = render(&a, 100, 30);
    assert!(screen.contains("▶ activations 0s 640/3100"), "{screen}");
}

/// The run view with half-block thumbnails of real files (a crop's box drawn on its original):
/// decoded, shrunk and encoded on worker threads, then drawn.
#[test]
fn run_view_with_half_block_thumbnails() {
    use std::time::{Duration, Instant};
    let mut a = in_layer4();
    let mut d = description(1);
    d.top_images = vec![
        TopImage {
            image: "d_photo.jpg".into(),
            crop: Some(CropRef {
                bbox: [100, 80, 300, 260],
                file: "crops/1_0.png".into(),
            }),
            activation: 3.0,
        },
        TopImage {
            image: "a_landscape.png".into(),
            crop: None,
            activation: 2.0,
        },
    ];
    a.show_stored(&d);
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    let roots = Roots {
        probe: &images,
        store: Path::new("/store"),
    };
    let mut thumbs = Thumbs::new(Some(ratatui_image::picker::Picker::halfblocks()));
    let mut t = Terminal::new(TestBackend::new(100, 30)).unwrap();
    let t0 = Instant::now();
    let mut last = String::new();
    let screen = loop {
        t.draw(|f| {
            draw(f, &a, &Theme::plain(), &mut thumbs, &roots);
        })
        .unwrap();
        thumbs.dispatch();
        let screen = t.backend().to_string();
        // Both thumbnails in, and nothing left to arrive.
        let blocks = screen.matches('▄').count() + screen.matches('▀').count();
        if blocks > 60 && screen == last {
            break screen;
        }
        last = screen.clone();
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "thumbnails never drawn:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(20));
        thumbs.poll();
    };
    insta::assert_snapshot!("run_view_half_blocks", screen);
}
