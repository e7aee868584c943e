//! The terminal UI: a view of [`app::App`] plus a loop that turns key presses and engine
//! events into state changes. All model work happens in the [`Engine`]; the UI thread only
//! updates state and draws.

pub mod app;
pub mod images;
pub mod theme;
pub mod ui;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossterm::event::{
    DisableMouseCapture, EnableMouseCapture, Event as TermEvent, EventStream, KeyCode, KeyEvent,
    KeyEventKind, KeyModifiers, MouseButton, MouseEvent, MouseEventKind,
};
use futures::StreamExt;
use indicatif::ProgressBar;
use tokio::runtime::Handle;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::activations::{ActivationCache, Pool};
use crate::config::{self, LlmChoice, Settings, SettingsArgs};
use crate::engine::{Engine, Resources};
use crate::error::{Error, Result};
use crate::hub::{self, HubOptions, ModelSource, ModelStatus};
use crate::pipeline::{Description, Event, Job, Params};
use crate::store::Store;
use crate::summarise::ApiOptions;
use crate::workspace::{self, Workspace};
use app::{Action, App, Effect, LayerRow, LlmView, Phase, Rerun, Setup};
use images::Thumbs;
use theme::Theme;

/// Where the settings come from: the file and the command line's flags. The UI can change
/// some of them (the LLM endpoint; a re-run's preset, candidates, steps, seed).
#[derive(Clone, Debug, Default)]
pub struct SettingsSource {
    pub file: Option<PathBuf>,
    pub args: SettingsArgs,
}

impl SettingsSource {
    fn load(&self, rerun: Option<&Rerun>) -> Result<config::Loaded> {
        let mut args = self.args.clone();
        if let Some(r) = rerun {
            args.preset = Some(r.preset);
            args.candidates = Some(r.candidates);
            args.steps = Some(r.steps);
            args.seed = Some(r.seed);
        }
        config::load(self.file.as_deref(), &args)
    }
}

/// What to do once the models are loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterLoad {
    /// Open this layer (and this neuron), as `--layer` / `--neuron` ask.
    Open {
        layer: Option<String>,
        neuron: Option<usize>,
    },
    /// Describe this neuron again (a re-run whose settings needed other models).
    Run(usize),
}

/// Results of the set-up work done off the UI thread.
enum SetupDone {
    /// The state of every model; `sized` when the Hub was asked for the sizes of missing
    /// files (else nothing touched the network).
    Status {
        models: Vec<ModelStatus>,
        sized: bool,
    },
    Downloaded(std::result::Result<(), String>),
    Loaded(Box<std::result::Result<Workspace, String>>),
}

/// The terminal UI: its state, the engine once models are loaded, and the channels that
/// bring the engine's events and the set-up work's results.
pub struct Session {
    pub app: App,
    engine: Option<Engine>,
    events_tx: UnboundedSender<Event>,
    events: UnboundedReceiver<Event>,
    setup_tx: UnboundedSender<SetupDone>,
    setup_rx: UnboundedReceiver<SetupDone>,
    store: Option<Arc<Store>>,
    source: SettingsSource,
    /// The re-run settings in force, when a re-run changed them.
    rerun: Option<Rerun>,
    settings: Settings,
    settings_file: PathBuf,
    local_llm: bool,
    params: Params,
    runtime: Handle,
    theme: Theme,
    thumbs: Thumbs,
    probe_root: PathBuf,
    /// Neurons per layer, by name.
    layer_sizes: Vec<(String, usize)>,
    after_load: Option<AfterLoad>,
    /// Advanced by downloads; read on every tick.
    download: ProgressBar,
    /// Where the list shown was drawn, for mouse clicks.
    list: Option<ui::ListArea>,
}

/// The key bindings.
pub fn action_for(key: KeyEvent, typing: bool) -> Option<Action> {
    if key.kind != KeyEventKind::Press {
        return None;
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
        return Some(Action::Quit);
    }
    Some(match key.code {
        KeyCode::Enter => Action::Open,
        KeyCode::Esc => Action::Back,
        KeyCode::Backspace if typing => Action::Erase,
        KeyCode::Char(c) if typing => Action::Type(c),
        KeyCode::Up | KeyCode::Char('k') => Action::Up,
        KeyCode::Down | KeyCode::Char('j') => Action::Down,
        KeyCode::Left => Action::Left,
        KeyCode::Right => Action::Right,
        KeyCode::Char('?') => Action::Help,
        KeyCode::Char('q') => Action::Quit,
        KeyCode::Char('R') => Action::Rerun,
        KeyCode::Char('n') => Action::NextUndescribed,
        KeyCode::Char('g') => Action::StartJump,
        KeyCode::Char('/') => Action::StartFilter,
        KeyCode::Char('a') => Action::Accept,
        KeyCode::Char('e') => Action::StartEdit,
        KeyCode::Char('r') => Action::Reject,
        KeyCode::Char(c @ '1'..='9') => Action::Choose(c as usize - '1' as usize),
        KeyCode::Char('d') => Action::Download,
        KeyCode::Char('u') => Action::EditLlmUrl,
        KeyCode::Char('m') => Action::EditLlmModel,
        KeyCode::Char('l') => Action::ToggleLocalLlm,
        _ => return None,
    })
}

fn current(s: &Settings) -> Rerun {
    Rerun {
        preset: s.preset,
        candidates: s.candidates,
        steps: s.steps,
        seed: s.seed,
    }
}

impl Session {
    /// Reads the settings and opens the set-up screen; the models are checked (and loaded
    /// when nothing is missing) once [`Session::run`] starts.
    pub fn new(
        source: SettingsSource,
        runtime: Handle,
        theme: Theme,
        thumbs: Thumbs,
        after_load: AfterLoad,
    ) -> Result<Self> {
        let loaded = source.load(None)?;
        let settings = loaded.settings.clone();
        let params = Params::from_settings(&settings, Pool::Mean)?;
        let (events_tx, events) = unbounded_channel();
        let (setup_tx, setup_rx) = unbounded_channel();
        let app = App::new(settings.target.to_string(), Vec::new(), current(&settings));
        let mut session = Self {
            app,
            engine: None,
            events_tx,
            events,
            setup_tx,
            setup_rx,
            store: None,
            source,
            rerun: None,
            probe_root: settings.probe.clone(),
            local_llm: loaded.llm_is_local(),
            settings_file: loaded.file,
            settings,
            params,
            runtime,
            theme,
            thumbs,
            layer_sizes: Vec::new(),
            after_load: Some(after_load),
            download: ProgressBar::hidden(),
            list: None,
        };
        session.app.set_up(session.new_setup());
        Ok(session)
    }

    fn hub(&self, progress: hub::Progress, offline: bool) -> HubOptions {
        let mut o = self.settings.hub_options(progress);
        o.offline |= offline;
        o
    }

    /// Checks every model on local disk (off the UI thread).
    fn recheck(&mut self) {
        if let Some(s) = &mut self.app.setup {
            s.llm = llm_view(&self.settings, self.local_llm);
            s.offline = self.settings.offline.0;
        }
        self.status(false);
    }

    /// The state of every model, off the UI thread; `sized` asks the Hub for the sizes of
    /// missing files too.
    fn status(&self, sized: bool) {
        let (settings, local, opts) = (
            self.settings.clone(),
            self.local_llm,
            self.hub(hub::Progress::Hidden, !sized),
        );
        let tx = self.setup_tx.clone();
        self.runtime.spawn(async move {
            let models = workspace::status(&settings, local, &opts).await;
            let _ = tx.send(SetupDone::Status { models, sized });
        });
    }

    /// Loads every model on a thread of its own; the engine starts when they are in.
    fn load(&mut self) {
        if let Some(s) = &mut self.app.setup {
            s.phase = Phase::Loading;
        }
        let (settings, local, opts) = (
            self.settings.clone(),
            self.local_llm,
            self.hub(hub::Progress::Hidden, false),
        );
        let (tx, rt) = (self.setup_tx.clone(), self.runtime.clone());
        std::thread::spawn(move || {
            let ws = Workspace::resolve(&rt, &settings, local, &opts)
                .and_then(|r| r.load(&settings, &crate::device::open(settings.device)?))
                .map_err(|e| e.to_string());
            let _ = tx.send(SetupDone::Loaded(Box::new(ws)));
        });
    }

    fn download(&mut self) {
        if let Some(s) = &mut self.app.setup {
            s.phase = Phase::Downloading {
                file: String::new(),
                done: 0,
                total: 0,
            };
        }
        self.download = ProgressBar::hidden();
        let opts = self.hub(hub::Progress::Bar(self.download.clone()), false);
        let (settings, local, tx) = (self.settings.clone(), self.local_llm, self.setup_tx.clone());
        self.runtime.spawn(async move {
            // Every model is tried, so one unreachable repo does not hold back the others.
            let mut errors = Vec::new();
            for role in settings.roles(local) {
                if let Err(e) = hub::resolve(role, settings.model(role), &opts).await {
                    errors.push(e.to_string());
                }
            }
            let done = if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("\n"))
            };
            let _ = tx.send(SetupDone::Downloaded(done));
        });
    }

    fn on_setup(&mut self, done: SetupDone) -> Result<()> {
        let Some(s) = &mut self.app.setup else {
            return Ok(());
        };
        match done {
            SetupDone::Status {
                models,
                sized: false,
            } => {
                s.models = models;
                if s.ready() {
                    self.app.notice = None;
                    self.load();
                } else {
                    if !matches!(s.phase, Phase::Failed(_)) {
                        s.phase = Phase::Waiting;
                    }
                    if !s.offline && !s.sizes_known {
                        self.status(true);
                    }
                }
            }
            SetupDone::Status {
                models,
                sized: true,
            } => {
                // Only sizes are new; a check since then may know better what is missing.
                for m in &mut s.models {
                    if let Some(sized) = models.iter().find(|x| x.role == m.role) {
                        m.remote_bytes = sized.remote_bytes;
                    }
                }
                s.sizes_known = true;
            }
            SetupDone::Downloaded(r) => {
                if let Err(e) = r {
                    s.phase = Phase::Failed(e);
                }
                self.recheck();
            }
            SetupDone::Loaded(ws) => match *ws {
                Ok(ws) => self.start_engine(ws)?,
                Err(e) => s.phase = Phase::Failed(e),
            },
        }
        Ok(())
    }

    /// The models are in: the engine starts and the layers are shown (or what `after_load`
    /// asks for).
    fn start_engine(&mut self, ws: Workspace) -> Result<()> {
        // A wrong --layer / --neuron is said, and the UI opens on the layers instead.
        if let Some(AfterLoad::Open {
            layer: Some(l),
            neuron,
        }) = &self.after_load
        {
            let t = &ws.models.target;
            if let Err(e) = t
                .layer_index(l)
                .and_then(|i| neuron.map_or(Ok(()), |n| t.check_neuron(i, n)))
            {
                self.app.notice = Some(e.to_string());
                self.after_load = None;
            }
        }
        let target = ws.models.target.name.clone();
        let rows = ws.store.rows(Some(&target), None)?;
        let stored = ws.store.targets()?;
        let layers: Vec<LayerRow> = ws
            .models
            .target
            .layers()
            .iter()
            .map(|l| LayerRow::new(&l.name, l.neurons, &rows))
            .collect();
        self.layer_sizes = layers.iter().map(|l| (l.name.clone(), l.neurons)).collect();
        self.probe_root = ws.probe.root.clone();
        self.store = Some(ws.store.clone());
        self.engine = Some(Engine::start(
            Resources {
                models: ws.models,
                probe: ws.probe,
                store: ws.store,
                llm: ws.llm,
                cache: Some(ActivationCache::new(&self.settings.cache_dir)),
                runtime: self.runtime.clone(),
            },
            self.events_tx.clone(),
        ));
        let notice = self.app.notice.take();
        self.app.loaded(target, layers, &stored);
        self.app.setup = None;
        self.app.notice = notice;
        tracing::info!("models loaded");
        match self.after_load.take() {
            Some(AfterLoad::Open {
                layer: Some(l),
                neuron,
            }) => {
                self.app.layer_sel = self
                    .app
                    .layers
                    .iter()
                    .position(|r| r.name == l)
                    .unwrap_or(0);
                self.open(Action::Open)?;
                if let Some(n) = neuron {
                    self.app.neuron_sel = n;
                    self.open(Action::Open)?;
                }
            }
            Some(AfterLoad::Run(neuron)) => {
                let layer = self.app.layer.clone().unwrap_or_default();
                self.carry_out(Effect::LoadLayer(layer))?;
                for e in self.app.describe(neuron, true) {
                    self.carry_out(e)?;
                }
            }
            Some(AfterLoad::Open { layer: None, .. }) | None => {}
        }
        Ok(())
    }

    /// Applies a re-run's settings: at once when the models stay, else after loading the
    /// ones the new preset names.
    fn rerun(&mut self, neuron: usize, r: Rerun) -> Result<()> {
        let loaded = self.source.load(Some(&r))?;
        let params = Params::from_settings(&loaded.settings, Pool::Mean)?;
        // The LLM is left out: the re-run form does not change it.
        let models = |s: &Settings| -> Vec<ModelSource> {
            s.roles(false)
                .into_iter()
                .map(|r| s.model(r).clone())
                .collect()
        };
        let same_models = models(&loaded.settings) == models(&self.settings);
        self.settings = loaded.settings;
        self.params = params;
        self.rerun = Some(r.clone());
        self.app.current = r;
        if same_models {
            for e in self.app.describe(neuron, true) {
                self.carry_out(e)?;
            }
            return Ok(());
        }
        // The old models go before the new ones load, so both never share the device.
        self.engine = None;
        self.after_load = Some(AfterLoad::Run(neuron));
        self.app.set_up(self.new_setup());
        self.recheck();
        Ok(())
    }

    /// Loads another target network (one with results in the store) in place of this one.
    fn switch_target(&mut self, name: &str) -> Result<()> {
        let source: ModelSource = name.parse().map_err(|reason| Error::Setting {
            key: "target".into(),
            reason,
        })?;
        let mut next = self.source.clone();
        next.args.target = Some(source);
        let loaded = next.load(self.rerun.as_ref())?;
        self.source = next;
        self.settings = loaded.settings;
        self.engine = None;
        self.after_load = None;
        self.app.set_up(self.new_setup());
        self.recheck();
        Ok(())
    }

    fn new_setup(&self) -> Setup {
        Setup {
            models: Vec::new(),
            sizes_known: false,
            offline: self.settings.offline.0,
            llm: llm_view(&self.settings, self.local_llm),
            phase: Phase::Checking,
            settings_file: self.settings_file.display().to_string(),
        }
    }

    /// Changes the LLM settings for this session and saves them to the settings file.
    fn set_llm(
        &mut self,
        local: Option<bool>,
        url: Option<String>,
        model: Option<String>,
    ) -> Result<()> {
        let mut saved: Vec<(&str, String)> = Vec::new();
        if let Some(l) = local {
            let choice = if l { LlmChoice::Local } else { LlmChoice::Api };
            self.source.args.llm = Some(choice);
            saved.push(("llm", choice.to_string()));
        }
        if let Some(u) = url {
            self.source.args.llm_url = Some(u.clone());
            saved.push(("llm_url", u));
        }
        if let Some(m) = model {
            self.source.args.llm_model = Some(m.clone());
            saved.push(("llm_model", m));
        }
        let pairs: Vec<(&str, &str)> = saved.iter().map(|(k, v)| (*k, v.as_str())).collect();
        config::save(&self.settings_file, &pairs)?;
        let loaded = self.source.load(self.rerun.as_ref())?;
        self.local_llm = loaded.llm_is_local();
        self.settings = loaded.settings;
        self.app.notice = Some(format!("saved to {}", self.settings_file.display()));
        self.recheck();
        Ok(())
    }

    fn carry_out(&mut self, effect: Effect) -> Result<bool> {
        match effect {
            Effect::Quit => return Ok(false),
            Effect::Cancel => {
                if let Some(e) = &self.engine {
                    e.cancel()
                }
            }
            Effect::LoadLayer(layer) => {
                let count = self
                    .layer_sizes
                    .iter()
                    .find(|(n, _)| *n == layer)
                    .map_or(0, |(_, c)| *c);
                let rows = self.store()?.rows(Some(&self.app.target), Some(&layer))?;
                self.app.set_neurons(&layer, count, &rows);
            }
            Effect::ShowStored(n) => {
                let layer = self.app.layer.clone().unwrap_or_default();
                let rows = self.store()?.rows(Some(&self.app.target), Some(&layer))?;
                if let Some(d) = rows
                    .iter()
                    .find(|r| r.neuron == n)
                    .and_then(|r| serde_json::from_value::<Description>(r.record.clone()).ok())
                {
                    self.app.show_stored(&d);
                }
            }
            Effect::Curate { neuron, decision } => {
                let layer = self.app.layer.clone().unwrap_or_default();
                let row = self
                    .store()?
                    .curate(&self.app.target, &layer, neuron, &decision)?;
                self.app.curated(&row);
            }
            Effect::Describe { neuron, force } => match &self.engine {
                Some(engine) => engine.submit(Job {
                    layer: self.app.layer.clone().unwrap_or_default(),
                    neurons: vec![neuron],
                    params: self.params.clone(),
                    force,
                }),
                None => self.app.busy = false,
            },
            Effect::Rerun { neuron, settings } => self.rerun(neuron, settings)?,
            Effect::SwitchTarget(name) => self.switch_target(&name)?,
            Effect::PresetSteps(p) => {
                let mut args = self.source.clone();
                args.args.preset = Some(p);
                let steps = args.load(None)?.settings.steps;
                if let Some(f) = &mut self.app.form {
                    f.numbers[1] = steps.to_string();
                }
            }
            Effect::Download => self.download(),
            Effect::Recheck => {
                if let Some(s) = &mut self.app.setup {
                    s.phase = Phase::Checking;
                }
                self.recheck()
            }
            Effect::SetLlm { local, url, model } => self.set_llm(local, url, model)?,
        }
        Ok(true)
    }

    fn store(&self) -> Result<&Arc<Store>> {
        self.store.as_ref().ok_or_else(|| Error::Setting {
            key: "db".into(),
            reason: "the results store is not open yet (the models are still loading)".into(),
        })
    }

    /// Applies `action` as if it had been typed.
    pub fn open(&mut self, action: Action) -> Result<()> {
        for effect in self.app.update(action) {
            self.carry_out(effect)?;
        }
        Ok(())
    }

    /// Runs the UI until the user quits. The terminal is restored on every way out,
    /// panics included.
    pub async fn run(mut self) -> Result<()> {
        let mut terminal = ratatui::init();
        // Mouse reports where the terminal gives them; turned off again on every way out.
        let _ = crossterm::execute!(std::io::stdout(), EnableMouseCapture);
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = crossterm::execute!(std::io::stdout(), DisableMouseCapture);
            hook(info);
        }));
        self.recheck();
        let result = self.event_loop(&mut terminal).await;
        let _ = crossterm::execute!(std::io::stdout(), DisableMouseCapture);
        ratatui::restore();
        result
    }

    /// A key or mouse action, with what it leads to; false when the UI should close.
    fn act(&mut self, a: Action) -> bool {
        self.app.notice = None;
        for effect in self.app.update(a) {
            match self.carry_out(effect) {
                Ok(true) => {}
                Ok(false) => return false,
                // A store that cannot be read or written, or a setting that cannot be
                // saved, is shown, and the UI stays up.
                Err(e) => self.app.notice = Some(e.to_string()),
            }
        }
        true
    }

    fn mouse(&self, m: MouseEvent) -> Option<Action> {
        match m.kind {
            MouseEventKind::ScrollUp => Some(Action::Up),
            MouseEventKind::ScrollDown => Some(Action::Down),
            MouseEventKind::Down(MouseButton::Left) => {
                let l = self.list.as_ref()?;
                let inside = m.column >= l.rows.x
                    && m.column < l.rows.right()
                    && m.row >= l.rows.y
                    && m.row < l.rows.bottom();
                inside.then(|| Action::Click(l.first + (m.row - l.rows.y) as usize))
            }
            _ => None,
        }
    }

    async fn event_loop(&mut self, terminal: &mut ratatui::DefaultTerminal) -> Result<()> {
        let mut keys = EventStream::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut dirty = true;
        loop {
            if dirty {
                let store_root = self
                    .store
                    .as_ref()
                    .map(|s| s.images_root().to_path_buf())
                    .unwrap_or_default();
                let roots = ui::Roots {
                    probe: &self.probe_root,
                    store: &store_root,
                };
                let (app, theme, thumbs) = (&self.app, &self.theme, &mut self.thumbs);
                let mut list = None;
                terminal
                    .draw(|f| list = ui::draw(f, app, theme, thumbs, &roots))
                    .map_err(|e| Error::io("terminal", e))?;
                self.list = list;
                self.thumbs.dispatch();
                dirty = false;
            }
            tokio::select! {
                ev = keys.next() => match ev {
                    Some(Ok(TermEvent::Key(k))) => {
                        if let Some(a) = action_for(k, self.app.typing()) {
                            if !self.act(a) {
                                return Ok(());
                            }
                            dirty = true;
                        }
                    }
                    Some(Ok(TermEvent::Mouse(m))) => {
                        if let Some(a) = self.mouse(m) {
                            if !self.act(a) {
                                return Ok(());
                            }
                            dirty = true;
                        }
                    }
                    Some(Ok(TermEvent::Resize(..))) => dirty = true,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(Error::io("terminal", e)),
                    None => return Ok(()),
                },
                ev = self.events.recv() => {
                    if let Some(ev) = ev {
                        self.app.on_event(ev);
                        dirty = true;
                    }
                }
                done = self.setup_rx.recv() => {
                    if let Some(done) = done {
                        if let Err(e) = self.on_setup(done) {
                            self.app.notice = Some(e.to_string());
                        }
                        dirty = true;
                    }
                }
                _ = tick.tick() => {
                    // A running stage's clock moves.
                    dirty |= self.app.busy;
                    dirty |= self.thumbs.poll();
                    dirty |= self.download_progress();
                }
            }
        }
    }

    /// Copies the download bar's state into the set-up screen; true when it moved.
    fn download_progress(&mut self) -> bool {
        let Some(Setup {
            phase: Phase::Downloading { file, done, total },
            ..
        }) = &mut self.app.setup
        else {
            return false;
        };
        let now = (
            self.download.message(),
            self.download.position(),
            self.download.length().unwrap_or(0),
        );
        let moved = (file.as_str(), *done, *total) != (now.0.as_str(), now.1, now.2);
        (*file, *done, *total) = now;
        moved
    }
}

/// The set-up screen's view of the LLM settings.
fn llm_view(s: &Settings, local: bool) -> LlmView {
    LlmView {
        local,
        url: s.llm_url.clone(),
        model: s.llm_model.clone(),
        key_set: s.llm_api_key.expose().is_some(),
        local_model: s.llm_local.to_string(),
        problem: if local {
            None
        } else {
            ApiOptions::from_settings(s).err().map(|e| e.to_string())
        },
    }
}
