//! The real binary's terminal UI inside tmux (send-keys, capture-pane) against the tiny
//! fixtures and the mock LLM: open layer4 of the fixture target at neuron 3, let it run,
//! re-run it from the form with another seed, accept its label, quit; `dnd export` then has
//! neuron 3's accepted label. And a first run with a model missing: the set-up screen, an
//! LLM setting saved, the files arriving, the layers. Needs tmux (.ci/run installs it).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::llm::MockLlm;
use common::mock_hub::MockHub;
use common::{copy_dir, dnd, fixture_model, fixtures, text};

static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let o = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux is installed (apt-get install tmux)");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "dnd"])
    }

    /// Waits until the screen shows `what`, or panics with the last screen.
    fn wait_for(&self, what: &str, limit: Duration) -> String {
        self.wait_for_all(&[what], limit)
    }

    /// Waits until one capture shows every string of `all`. A capture can fall in the middle of
    /// a redraw, so what should be on one screen together is waited for, not asserted after
    /// waiting for one of it.
    fn wait_for_all(&self, all: &[&str], limit: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.screen();
            if all.iter().all(|what| s.contains(what)) {
                return s;
            }
            if t0.elapsed() > limit {
                panic!("{all:?} did not all appear within {limit:?}; the screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

/// Starts the real `dnd` UI in a fresh tmux server at 120x40, with a clean environment
/// under `home`, the fixture models (the captioner as given) and the mock LLM.
/// `models` are the captioner and synthesiser flags ([`models`]; none: the preset's);
/// `hub` is the Hub's address (`HF_ENDPOINT`); without one, dnd is offline.
fn start(
    home: &std::path::Path,
    models: &str,
    llm: &MockLlm,
    hub: Option<&MockHub>,
    extra: &str,
) -> Tmux {
    let h = home.display().to_string();
    let hub = hub.map_or("HF_HUB_OFFLINE=1".to_string(), |m| {
        format!("HF_ENDPOINT={}", m.url())
    });
    let dnd_cmd = format!(
        "env -i PATH=/usr/bin:/bin HOME={h} XDG_CACHE_HOME={h}/cache XDG_DATA_HOME={h}/data XDG_CONFIG_HOME={h}/config HF_HOME={h}/hf {hub} TERM=xterm-256color \
         {bin} --device cpu --target {t} {models} --clip {clip} --probe {probe} --db {h}/out/dnd.sqlite \
         --llm-url {url} --llm-model mock --top-k 3 --images-per-concept 2 --caption-tokens 8 --images halfblocks {extra}",
        bin = env!("CARGO_BIN_EXE_dnd"),
        t = fixture_model("resnet_basic"),
        clip = fixture_model("clip_tiny"),
        probe = fixtures().join("images").display(),
        url = llm.url(),
    );
    let tmux = Tmux {
        // One tmux server per test: tests run in parallel.
        socket: format!(
            "dnd-test-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ),
    };
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "dnd",
        "-x",
        "120",
        "-y",
        "40",
        &dnd_cmd,
    ]);
    tmux
}

/// The captioner flag as given, the fixture synthesiser.
fn models(captioner: &str) -> String {
    format!(
        "--captioner {captioner} --synthesiser {}",
        fixture_model("sd_tiny")
    )
}

impl Tmux {
    fn keys(&self, keys: &[&str]) {
        for k in keys {
            self.run(&["send-keys", "-t", "dnd", k]);
        }
    }

    fn wait_until_quit(&self) {
        let t0 = Instant::now();
        while self.run(&["list-sessions"]).contains("dnd:") {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "dnd did not quit on q"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn open_a_neuron_run_it_accept_its_label_quit_and_export() {
    let home = tempfile::tempdir().unwrap();
    // Slow answers keep the run in flight while keys are timed.
    let llm = MockLlm::start(&[], None, Duration::from_millis(150));
    let db = home.path().join("out/dnd.sqlite").display().to_string();
    let tmux = start(
        home.path(),
        &models(&fixture_model("blip_tiny")),
        &llm,
        None,
        "--layer layer4 --neuron 3",
    );
    tmux.wait_for("stages", Duration::from_secs(60));

    // Key latency while the run is in flight: toggle the help overlay and time until the
    // screen shows the change, for as long as the run lasts.
    let mut latencies = Vec::new();
    let mut shown = false;
    while latencies.len() < 200 {
        let t0 = Instant::now();
        tmux.run(&["send-keys", "-t", "dnd", "?"]);
        shown = !shown;
        let screen = loop {
            let s = tmux.screen();
            if s.contains(" keys ") == shown {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no answer to a key:\n{s}"
            );
        };
        latencies.push(t0.elapsed());
        if screen.contains("✓ scoring") {
            break;
        }
    }
    if shown {
        tmux.run(&["send-keys", "-t", "dnd", "?"]);
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let worst = *latencies.last().unwrap();
    eprintln!(
        "key latency during the run: {} presses, median {median:?}, worst {worst:?} (tmux send-keys to capture-pane)",
        latencies.len()
    );
    assert!(
        latencies.len() >= 5,
        "the run ended before keys could be measured"
    );
    assert!(
        median < Duration::from_millis(50),
        "median key latency {median:?}"
    );

    tmux.wait_for_all(
        &["label: ", "layer4 › neuron 3", "✓ scoring"],
        Duration::from_secs(90),
    );

    // R: the re-run form, another seed, Enter: the neuron runs again with it.
    tmux.keys(&["R"]);
    tmux.wait_for("re-run neuron 3", Duration::from_secs(10));
    tmux.keys(&["Down", "Down", "Down", "BSpace", "7"]);
    tmux.wait_for("seed        7", Duration::from_secs(10));
    tmux.keys(&["Enter"]);
    tmux.wait_for("[running]", Duration::from_secs(10));
    let t0 = Instant::now();
    loop {
        let s = tmux.screen();
        if !s.contains("[running]") && s.contains("label: ") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the re-run did not finish:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    tmux.keys(&["a"]);
    // The status line has the whole label (the panel title may cut it).
    let screen = tmux.wait_for("neuron 3: accepted — ", Duration::from_secs(10));
    let label = screen
        .split("neuron 3: accepted — ")
        .nth(1)
        .and_then(|r| r.lines().next())
        .unwrap()
        .trim()
        .to_string();
    tmux.run(&["send-keys", "-t", "dnd", "Escape"]);
    tmux.wait_for_all(&["neurons (64)", "3  accepted"], Duration::from_secs(10));
    tmux.keys(&["q"]);
    tmux.wait_until_quit();

    let o = dnd(home.path(), &["export", "--db", &db, "--layer", "layer4"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.starts_with("Neuron ID,Label 1,Label 2,Label 3,Status"),
        "{out}"
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("3,"))
        .expect("neuron 3 exported");
    assert!(
        line.starts_with(&format!("3,{label},")) && line.ends_with(",accepted"),
        "{line}"
    );
}

#[test]
fn first_run_with_a_model_missing_shows_set_up_then_loads_once_it_is_there() {
    let home = tempfile::tempdir().unwrap();
    let llm = MockLlm::start(&[], None, Duration::ZERO);
    let blip = home.path().join("blip");
    let tmux = start(
        home.path(),
        &models(&blip.display().to_string()),
        &llm,
        None,
        "",
    );
    // The screen's frame shows before the lookup on disk ends: wait for its outcome.
    tmux.wait_for_all(
        &[
            "dnd is offline",
            "set-up",
            "missing",
            "dnd --captioner /path/to/folder",
            "mock   (m: edit)",
        ],
        Duration::from_secs(30),
    );

    // m: the model name is edited and saved to the settings file.
    tmux.keys(&["m", "BSpace", "BSpace", "BSpace", "BSpace"]);
    for c in ["m", "o", "c", "k", "2", "Enter"] {
        tmux.keys(&[c]);
    }
    tmux.wait_for("saved to", Duration::from_secs(10));
    let file = home.path().join("config/dnd/config.toml");
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(saved.contains("llm_model = \"mock2\""), "{saved}");

    // The model files arrive; Enter checks again, loads, and shows the layers.
    copy_dir(&std::path::PathBuf::from(fixture_model("blip_tiny")), &blip);
    tmux.keys(&["Enter"]);
    tmux.wait_for_all(&["layer4", " layers "], Duration::from_secs(60));
    tmux.keys(&["q"]);
    tmux.wait_until_quit();
}

#[test]
fn d_downloads_a_missing_model_from_the_hub_then_loads() {
    let home = tempfile::tempdir().unwrap();
    let llm = MockLlm::start(&[], None, Duration::ZERO);
    let hub = MockHub::start(&[(
        "org/blip-tiny",
        &std::path::PathBuf::from(fixture_model("blip_tiny")),
    )]);
    let tmux = start(home.path(), &models("org/blip-tiny"), &llm, Some(&hub), "");
    tmux.wait_for_all(
        &["KiB to download", "d downloads the 1 missing model(s)"],
        Duration::from_secs(30),
    );
    tmux.keys(&["d"]);
    tmux.wait_for_all(&[" layers ", "layer4"], Duration::from_secs(60));
    tmux.keys(&["q"]);
    tmux.wait_until_quit();
    assert!(home
        .path()
        .join("hf/hub/models--org--blip-tiny/refs/main")
        .is_file());
}

#[test]
fn esc_up_to_the_targets_and_open_another_with_stored_results() {
    let home = tempfile::tempdir().unwrap();
    let llm = MockLlm::start(&[], None, Duration::ZERO);
    // A result for another target in the same store.
    let mut args = vec!["describe".to_string()];
    args.extend(common::describe_flags(home.path(), &llm.url(), "vit_tiny"));
    args.extend(["--layer", "blocks.1", "--neurons", "0"].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = common::dnd(home.path(), &refs);
    assert!(o.status.success(), "{}", text(&o).1);
    let tmux = start(
        home.path(),
        &models(&fixture_model("blip_tiny")),
        &llm,
        None,
        "",
    );
    tmux.wait_for(" layers ", Duration::from_secs(60));
    tmux.keys(&["Escape"]);
    tmux.wait_for_all(
        &["target network", "resnet_basic", "loaded", "vit_tiny"],
        Duration::from_secs(10),
    );
    tmux.keys(&["Down", "Enter"]);
    tmux.wait_for_all(&["blocks.1", "vit_tiny"], Duration::from_secs(60));
    tmux.keys(&["q"]);
    tmux.wait_until_quit();
}

#[test]
fn rerun_with_the_paper_preset_loads_its_models_then_runs() {
    let home = tempfile::tempdir().unwrap();
    let llm = MockLlm::start(&[], None, Duration::ZERO);
    // Each preset's Hub repos, served from the fixtures.
    let (blip, sd) = (
        std::path::PathBuf::from(fixture_model("blip_tiny")),
        std::path::PathBuf::from(fixture_model("sd_tiny")),
    );
    let hub = MockHub::start(&[
        ("Salesforce/blip-image-captioning-large", &blip),
        ("stabilityai/sd-turbo", &sd),
        ("Salesforce/blip-image-captioning-base", &blip),
        ("CompVis/stable-diffusion-v1-4", &sd),
    ]);
    let tmux = start(
        home.path(),
        "",
        &llm,
        Some(&hub),
        "--layer layer4 --neuron 3",
    );
    tmux.wait_for("KiB to download", Duration::from_secs(30));
    tmux.keys(&["d"]);
    let finished = |tmux: &Tmux| loop {
        let s = tmux.wait_for_all(&["label: ", "layer4 › neuron 3"], Duration::from_secs(120));
        if !s.contains("[running]") {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    finished(&tmux);

    // R, the paper preset: its models are not on disk, so the set-up screen comes back.
    tmux.keys(&["R", "Right"]);
    tmux.wait_for("steps       50", Duration::from_secs(10));
    tmux.keys(&["Enter"]);
    // The screen shows "what next" at once, the models once they are looked up on disk.
    tmux.wait_for_all(
        &["what next", "CompVis/stable-diffusion-v1-4"],
        Duration::from_secs(30),
    );
    tmux.wait_for("KiB to download", Duration::from_secs(30));
    tmux.keys(&["d"]);
    finished(&tmux);
    tmux.keys(&["q"]);
    tmux.wait_until_quit();

    let db = home.path().join("out/dnd.sqlite").display().to_string();
    let o = common::dnd(home.path(), &["export", "--db", &db, "--format", "json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let line: serde_json::Value = serde_json::from_str(
        out.lines()
            .find(|l| l.contains("\"neuron\":3"))
            .expect("neuron 3 exported"),
    )
    .unwrap();
    let models = &line["models"];
    assert_eq!(
        models["synthesiser"]["source"], "CompVis/stable-diffusion-v1-4",
        "{line}"
    );
    assert_eq!(
        models["captioner"]["source"],
        "Salesforce/blip-image-captioning-base@refs/pr/7"
    );
}
