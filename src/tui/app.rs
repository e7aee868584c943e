//! The terminal UI's state and how user actions and pipeline events change it. Nothing here
//! draws or does I/O: `update` returns the effects for the loop to carry out.

use std::collections::BTreeMap;

use crate::config::Preset;
use crate::hub::ModelStatus;
use crate::pipeline::{CandidateScore, Description, Event, Stage, TopImage};
use crate::store::{Curation, Review, Row, Status};

/// One layer of the target, with how much of it is described.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRow {
    pub name: String,
    pub neurons: usize,
    pub described: usize,
    pub accepted: usize,
    pub edited: usize,
    pub rejected: usize,
    pub failed: usize,
}

impl LayerRow {
    /// A layer's counts from its stored rows.
    pub fn new(name: &str, neurons: usize, rows: &[Row]) -> Self {
        let mine = || rows.iter().filter(|r| r.layer == name);
        let reviewed = |v: Review| mine().filter(|r| r.review == v).count();
        Self {
            name: name.to_string(),
            neurons,
            described: mine().filter(|r| r.status == Status::Described).count(),
            accepted: reviewed(Review::Accepted),
            edited: reviewed(Review::Edited),
            rejected: reviewed(Review::Rejected),
            failed: mine().filter(|r| r.status == Status::Failed).count(),
        }
    }
}

/// One neuron of the open layer.
#[derive(Clone, Debug, PartialEq)]
pub struct NeuronRow {
    pub neuron: usize,
    pub status: Option<Status>,
    pub review: Review,
    /// The label in force (curated, else the pipeline's).
    pub label: Option<String>,
}

/// A target network: the loaded one, or one with results in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetRow {
    /// Its source (Hub id or folder), as stored.
    pub name: String,
    pub described: usize,
    pub loaded: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Screen {
    /// Models and LLM settings, shown while they load and whenever something is missing.
    Setup,
    Targets,
    Layers,
    Neurons,
    Run,
}

/// A one-line prompt at the bottom of the neuron list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    Jump(String),
    Filter(String),
    /// Editing the open neuron's label.
    Edit(String),
    /// Editing the LLM endpoint's URL / model name on the set-up screen.
    LlmUrl(String),
    LlmModel(String),
}

/// How far the set-up has come.
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// The models are being looked for on disk.
    Checking,
    /// Something is missing; the user acts (download, edit, point at folders).
    Waiting,
    Downloading {
        file: String,
        done: u64,
        total: u64,
    },
    /// Every file is there; the weights are loading.
    Loading,
    /// A download or the loading failed, for this reason.
    Failed(String),
}

/// The LLM settings shown (and partly edited) on the set-up screen. The API key itself is
/// never held here: only whether one is set.
#[derive(Clone, Debug, PartialEq)]
pub struct LlmView {
    pub local: bool,
    pub url: String,
    pub model: String,
    pub key_set: bool,
    /// The local model's source, when local.
    pub local_model: String,
    /// Why the endpoint cannot be used as configured.
    pub problem: Option<String>,
}

/// The set-up screen's state.
#[derive(Clone, Debug, PartialEq)]
pub struct Setup {
    pub models: Vec<ModelStatus>,
    /// The Hub has been asked for the sizes of missing files.
    pub sizes_known: bool,
    pub offline: bool,
    pub llm: LlmView,
    pub phase: Phase,
    /// The settings file, for the hints.
    pub settings_file: String,
}

impl Setup {
    /// Models and LLM are usable as they stand.
    pub fn ready(&self) -> bool {
        self.models.iter().all(|m| m.missing.is_empty()) && self.llm.problem.is_none()
    }
}

/// The re-run form's fields, in order.
pub const FORM_FIELDS: [&str; 4] = ["preset", "candidates", "steps", "seed"];

/// The re-run form (`R`): the settings a re-run may change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Form {
    pub neuron: usize,
    pub preset: Preset,
    /// candidates, steps, seed, as typed.
    pub numbers: [String; 3],
    /// The selected field (index into [`FORM_FIELDS`]).
    pub field: usize,
}

/// The settings a re-run asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rerun {
    pub preset: Preset,
    pub candidates: usize,
    pub steps: usize,
    pub seed: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub enum StageState {
    #[default]
    Waiting,
    Running {
        since: std::time::Instant,
    },
    Done(f64),
}

/// Everything the run view shows about one neuron, filled in as events arrive.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunView {
    pub neuron: usize,
    pub stages: BTreeMap<Stage, StageState>,
    pub top: Vec<TopImage>,
    pub captions: Vec<String>,
    pub simplified: BTreeMap<usize, String>,
    pub summaries: BTreeMap<usize, String>,
    /// Text of the LLM answer being written, as it streams.
    pub streaming: String,
    /// Images through the layer-wide activation pass, of all (when it runs).
    pub activations: Option<(usize, usize)>,
    pub candidates: Vec<String>,
    pub synthetic: Vec<(String, Vec<String>)>,
    pub scores: Vec<CandidateScore>,
    pub description: Option<Description>,
}

impl RunView {
    fn new(neuron: usize) -> Self {
        Self {
            neuron,
            stages: Stage::ALL
                .iter()
                .map(|&s| (s, StageState::Waiting))
                .collect(),
            ..Default::default()
        }
    }

    /// The view of a stored description (nothing is running).
    pub fn from_description(d: &Description) -> Self {
        let mut v = Self::new(d.neuron);
        for s in Stage::ALL {
            let secs = d.timings.get(s.name()).copied();
            v.stages
                .insert(s, secs.map_or(StageState::Waiting, StageState::Done));
        }
        v.top = d.top_images.clone();
        v.captions = d.captions.clone();
        v.simplified = d
            .simplified
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.clone().map(|s| (i, s)))
            .collect();
        v.candidates = d.candidates.iter().map(|c| c.concept.clone()).collect();
        v.synthetic = d
            .synthetic
            .iter()
            .map(|s| (s.concept.clone(), s.files.clone()))
            .collect();
        v.scores = d.candidates.clone();
        v.description = Some(d.clone());
        v
    }
}

/// What the user asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Up,
    Down,
    Open,
    Back,
    Help,
    Quit,
    /// `R`: describe the open neuron again.
    Rerun,
    /// `n`: the next neuron without a description.
    NextUndescribed,
    /// `g` / `/`: start typing a neuron number / a filter.
    StartJump,
    StartFilter,
    /// `a` / `e` / `r` in the run view: accept, edit, reject the label.
    Accept,
    StartEdit,
    Reject,
    /// `1`-`9` in the run view: take that row of the score table as the label.
    Choose(usize),
    Type(char),
    Erase,
    /// Left / right: change a choice (the form's preset).
    Left,
    Right,
    /// A click on row `n` of the list shown (layers or neurons).
    Click(usize),
    /// `d` on the set-up screen: download what is missing.
    Download,
    /// `u` / `m` / `l` on the set-up screen: edit the LLM URL / model, switch API and local.
    EditLlmUrl,
    EditLlmModel,
    ToggleLocalLlm,
}

/// What the loop must do after an update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Read the stored rows of this layer and hand them to [`App::set_neurons`].
    LoadLayer(String),
    /// Describe this neuron (again when `force`).
    Describe {
        neuron: usize,
        force: bool,
    },
    /// Load this target network (its Hub id or folder) instead of the loaded one.
    SwitchTarget(String),
    /// Show this stored neuron (hand its row to [`App::show_stored`]).
    ShowStored(usize),
    /// Store a curation decision on this neuron and hand the row to [`App::curated`].
    Curate {
        neuron: usize,
        decision: Curation,
    },
    /// Re-run this neuron with changed settings (models reload when the preset needs others).
    Rerun {
        neuron: usize,
        settings: Rerun,
    },
    /// Fill a new re-run form's steps for this preset (what the settings give under it).
    PresetSteps(Preset),
    /// Download the missing models.
    Download,
    /// Check the models again and load them when nothing is missing.
    Recheck,
    /// Change and save LLM settings (`None` leaves one as it is).
    SetLlm {
        local: Option<bool>,
        url: Option<String>,
        model: Option<String>,
    },
    Cancel,
    Quit,
}

pub struct App {
    pub target: String,
    pub screen: Screen,
    pub targets: Vec<TargetRow>,
    pub target_sel: usize,
    pub layers: Vec<LayerRow>,
    pub layer_sel: usize,
    pub layer: Option<String>,
    pub neurons: Vec<NeuronRow>,
    pub neuron_sel: usize,
    pub filter: String,
    pub prompt: Option<Prompt>,
    pub run: Option<RunView>,
    pub setup: Option<Setup>,
    pub form: Option<Form>,
    /// The settings in force, which a re-run form starts from.
    pub current: Rerun,
    /// A describe job is in flight.
    pub busy: bool,
    pub help: bool,
    /// `q` while busy asks first; a second `q` quits.
    pub confirm_quit: bool,
    /// The last notice for the status line (errors included).
    pub notice: Option<String>,
}

impl App {
    pub fn new(target: String, layers: Vec<LayerRow>, current: Rerun) -> Self {
        Self {
            target,
            screen: Screen::Layers,
            targets: Vec::new(),
            target_sel: 0,
            current,
            layers,
            layer_sel: 0,
            layer: None,
            neurons: Vec::new(),
            neuron_sel: 0,
            filter: String::new(),
            prompt: None,
            run: None,
            setup: None,
            form: None,
            busy: false,
            help: false,
            confirm_quit: false,
            notice: None,
        }
    }

    /// The neuron rows the filter lets through, in order.
    pub fn visible(&self) -> Vec<&NeuronRow> {
        let f = self.filter.to_lowercase();
        self.neurons
            .iter()
            .filter(|r| {
                f.is_empty()
                    || r.label
                        .as_deref()
                        .is_some_and(|l| l.to_lowercase().contains(&f))
                    || neuron_state(r).contains(&f)
            })
            .collect()
    }

    /// The set-up screen, shown while models are found and loaded.
    pub fn set_up(&mut self, setup: Setup) {
        self.setup = Some(setup);
        self.screen = Screen::Setup;
    }

    /// The models are loaded: the layers of `target` are shown. `stored` are the targets
    /// with results in the store, with their described counts.
    pub fn loaded(&mut self, target: String, layers: Vec<LayerRow>, stored: &[(String, usize)]) {
        if target != self.target {
            (self.layer, self.run, self.layer_sel) = (None, None, 0);
            self.neurons.clear();
        }
        self.targets = vec![TargetRow {
            name: target.clone(),
            described: layers.iter().map(|l| l.described).sum(),
            loaded: true,
        }];
        self.targets
            .extend(
                stored
                    .iter()
                    .filter(|(n, _)| *n != target)
                    .map(|(name, described)| TargetRow {
                        name: name.clone(),
                        described: *described,
                        loaded: false,
                    }),
            );
        self.target_sel = 0;
        self.target = target;
        self.layers = layers;
        self.layer_sel = self.layer_sel.min(self.layers.len().saturating_sub(1));
        self.screen = Screen::Layers;
    }

    /// The stored rows of the open layer.
    pub fn set_neurons(&mut self, layer: &str, count: usize, rows: &[Row]) {
        self.layer = Some(layer.to_string());
        self.neurons = (0..count)
            .map(|n| NeuronRow {
                neuron: n,
                status: None,
                review: Review::Unreviewed,
                label: None,
            })
            .collect();
        for r in rows {
            if let Some(row) = self.neurons.get_mut(r.neuron) {
                row.status = Some(r.status);
                row.review = r.review;
                row.label = r.current_label().map(String::from);
            }
        }
        self.neuron_sel = self.neuron_sel.min(count.saturating_sub(1));
        self.screen = Screen::Neurons;
    }

    /// Opens the run view on a stored description.
    pub fn show_stored(&mut self, d: &Description) {
        self.run = Some(RunView::from_description(d));
        self.screen = Screen::Run;
    }

    /// A curation decision was stored: the rows and counts follow.
    pub fn curated(&mut self, row: &Row) {
        let before = self.neurons.get(row.neuron).map(|n| n.review);
        if let Some(n) = self.neurons.get_mut(row.neuron) {
            n.review = row.review;
            n.label = row.current_label().map(String::from);
        }
        if let Some(l) = self.layers.iter_mut().find(|l| l.name == row.layer) {
            for (review, step) in [(before, -1i64), (Some(row.review), 1)] {
                let slot = match review {
                    Some(Review::Accepted) => &mut l.accepted,
                    Some(Review::Edited) => &mut l.edited,
                    Some(Review::Rejected) => &mut l.rejected,
                    _ => continue,
                };
                *slot = (*slot as i64 + step).max(0) as usize;
            }
        }
        self.notice = Some(format!(
            "neuron {}: {} — {}",
            row.neuron,
            row.review.as_str(),
            row.current_label().unwrap_or("")
        ));
    }

    /// The open neuron when it has a description to curate.
    fn curatable(&self) -> Option<usize> {
        let run = self.run.as_ref()?;
        let d = run.description.as_ref()?;
        (self.screen == Screen::Run && !self.busy && d.status == Status::Described)
            .then_some(run.neuron)
    }

    fn curate(&mut self, decision: Curation) -> Vec<Effect> {
        match self.curatable() {
            Some(neuron) => vec![Effect::Curate { neuron, decision }],
            None => {
                self.notice =
                    Some("only a finished, described neuron's label can be curated".into());
                Vec::new()
            }
        }
    }

    fn selected_neuron(&self) -> Option<usize> {
        self.visible().get(self.neuron_sel).map(|r| r.neuron)
    }

    /// Starts describing `neuron` (again when `force`), unless a run is in flight.
    pub fn describe(&mut self, neuron: usize, force: bool) -> Vec<Effect> {
        if self.busy {
            self.notice = Some("a run is in flight: Esc cancels it first".into());
            return Vec::new();
        }
        self.busy = true;
        self.run = Some(RunView::new(neuron));
        self.screen = Screen::Run;
        vec![Effect::Describe { neuron, force }]
    }

    /// The keyboard is typing into a prompt or the form.
    pub fn typing(&self) -> bool {
        self.prompt.is_some() || self.form.is_some()
    }

    fn update_form(&mut self, action: Action) -> Vec<Effect> {
        let Some(form) = &mut self.form else {
            return Vec::new();
        };
        match action {
            Action::Up => form.field = form.field.saturating_sub(1),
            Action::Down => form.field = (form.field + 1).min(FORM_FIELDS.len() - 1),
            Action::Left | Action::Right | Action::Type(' ') if form.field == 0 => {
                form.preset = match form.preset {
                    Preset::Fast => Preset::Paper,
                    Preset::Paper => Preset::Fast,
                };
                return vec![Effect::PresetSteps(form.preset)];
            }
            Action::Type(c) if form.field > 0 && c.is_ascii_digit() => {
                form.numbers[form.field - 1].push(c)
            }
            Action::Erase if form.field > 0 => {
                form.numbers[form.field - 1].pop();
            }
            Action::Back => self.form = None,
            Action::Open => {
                let parse = |i: usize| form.numbers[i].parse::<u64>().ok();
                let (Some(candidates), Some(steps), Some(seed)) = (parse(0), parse(1), parse(2))
                else {
                    self.notice = Some("candidates, steps and seed must be numbers".into());
                    return Vec::new();
                };
                if candidates == 0 || steps == 0 {
                    self.notice = Some("candidates and steps must be at least 1".into());
                    return Vec::new();
                }
                let (neuron, preset) = (form.neuron, form.preset);
                self.form = None;
                if self.busy {
                    self.notice = Some("a run is in flight: Esc cancels it first".into());
                    return Vec::new();
                }
                let settings = Rerun {
                    preset,
                    candidates: candidates as usize,
                    steps: steps as usize,
                    seed,
                };
                return vec![Effect::Rerun { neuron, settings }];
            }
            _ => {}
        }
        Vec::new()
    }

    fn update_setup(&mut self, action: Action) -> Vec<Effect> {
        let Some(setup) = &self.setup else {
            return Vec::new();
        };
        if matches!(setup.phase, Phase::Downloading { .. } | Phase::Loading) {
            return Vec::new();
        }
        match action {
            Action::Download if setup.models.iter().all(|m| m.missing.is_empty()) => {
                self.notice = Some("every model is on disk".into())
            }
            Action::Download if setup.offline => {
                self.notice =
                    Some("offline (--offline or HF_HUB_OFFLINE): nothing can be downloaded".into())
            }
            Action::Download => return vec![Effect::Download],
            Action::Open => return vec![Effect::Recheck],
            Action::EditLlmUrl => self.prompt = Some(Prompt::LlmUrl(setup.llm.url.clone())),
            Action::EditLlmModel => self.prompt = Some(Prompt::LlmModel(setup.llm.model.clone())),
            Action::ToggleLocalLlm => {
                return vec![Effect::SetLlm {
                    local: Some(!setup.llm.local),
                    url: None,
                    model: None,
                }]
            }
            _ => {}
        }
        Vec::new()
    }

    pub fn update(&mut self, action: Action) -> Vec<Effect> {
        if action != Action::Quit {
            self.confirm_quit = false;
        }
        if self.form.is_some() && action != Action::Quit {
            return self.update_form(action);
        }
        if let Some(p) = &mut self.prompt {
            match action {
                Action::Type(c) => {
                    match p {
                        Prompt::Jump(t) if c.is_ascii_digit() => t.push(c),
                        Prompt::Jump(_) => {}
                        Prompt::Filter(t)
                        | Prompt::Edit(t)
                        | Prompt::LlmUrl(t)
                        | Prompt::LlmModel(t) => t.push(c),
                    }
                    if let Prompt::Filter(t) = p {
                        self.filter = t.clone();
                        self.neuron_sel = 0;
                    }
                }
                Action::Erase => match p {
                    Prompt::Jump(t) | Prompt::Edit(t) | Prompt::LlmUrl(t) | Prompt::LlmModel(t) => {
                        t.pop();
                    }
                    Prompt::Filter(t) => {
                        t.pop();
                        self.filter = t.clone();
                    }
                },
                Action::Open => {
                    if let Prompt::LlmUrl(t) | Prompt::LlmModel(t) = p {
                        let text = t.trim().to_string();
                        let is_url = matches!(p, Prompt::LlmUrl(_));
                        self.prompt = None;
                        if text.is_empty() {
                            return Vec::new();
                        }
                        let (url, model) = if is_url {
                            (Some(text), None)
                        } else {
                            (None, Some(text))
                        };
                        return vec![Effect::SetLlm {
                            local: None,
                            url,
                            model,
                        }];
                    }
                    if let Prompt::Edit(t) = p {
                        let text = t.trim().to_string();
                        self.prompt = None;
                        if text.is_empty() {
                            self.notice = Some("an empty label is not saved".into());
                            return Vec::new();
                        }
                        return self.curate(Curation::Edit(text));
                    }
                    if let Prompt::Jump(t) = p {
                        let n: Option<usize> = t.parse().ok();
                        self.filter.clear();
                        match n.filter(|&n| n < self.neurons.len()) {
                            Some(n) => self.neuron_sel = n,
                            None => {
                                self.notice = Some(format!(
                                    "no neuron {t}: this layer has 0..{}",
                                    self.neurons.len().saturating_sub(1)
                                ))
                            }
                        }
                    }
                    self.prompt = None;
                }
                Action::Back => {
                    if matches!(p, Prompt::Filter(_)) {
                        self.filter.clear();
                    }
                    self.prompt = None;
                }
                _ => {}
            }
            return Vec::new();
        }
        match action {
            Action::Help => self.help = !self.help,
            Action::Quit => {
                if self.busy && !self.confirm_quit {
                    self.confirm_quit = true;
                    self.notice = Some(
                        "a run is in flight: q again quits (its neuron is lost), Esc cancels it"
                            .into(),
                    );
                } else {
                    return vec![Effect::Cancel, Effect::Quit];
                }
            }
            Action::Back if self.help => self.help = false,
            _ if self.help => {}
            _ if self.screen == Screen::Setup => return self.update_setup(action),
            Action::Click(row) => match self.screen {
                Screen::Targets if row < self.targets.len() => {
                    if row == self.target_sel {
                        return self.update(Action::Open);
                    }
                    self.target_sel = row;
                }
                Screen::Layers if row < self.layers.len() => {
                    if row == self.layer_sel {
                        return self.update(Action::Open);
                    }
                    self.layer_sel = row;
                }
                Screen::Neurons if row < self.visible().len() => {
                    if row == self.neuron_sel {
                        return self.update(Action::Open);
                    }
                    self.neuron_sel = row;
                }
                _ => {}
            },
            Action::Up => match self.screen {
                Screen::Targets => self.target_sel = self.target_sel.saturating_sub(1),
                Screen::Layers => self.layer_sel = self.layer_sel.saturating_sub(1),
                Screen::Neurons => self.neuron_sel = self.neuron_sel.saturating_sub(1),
                Screen::Run | Screen::Setup => {}
            },
            Action::Down => match self.screen {
                Screen::Targets => {
                    self.target_sel =
                        (self.target_sel + 1).min(self.targets.len().saturating_sub(1))
                }
                Screen::Layers => {
                    self.layer_sel = (self.layer_sel + 1).min(self.layers.len().saturating_sub(1))
                }
                Screen::Neurons => {
                    self.neuron_sel =
                        (self.neuron_sel + 1).min(self.visible().len().saturating_sub(1))
                }
                Screen::Run | Screen::Setup => {}
            },
            Action::Open => match self.screen {
                Screen::Targets => match self.targets.get(self.target_sel) {
                    Some(t) if t.loaded => self.screen = Screen::Layers,
                    Some(t) => {
                        if self.busy {
                            self.notice = Some("a run is in flight: Esc cancels it first".into());
                        } else {
                            return vec![Effect::SwitchTarget(t.name.clone())];
                        }
                    }
                    None => {}
                },
                Screen::Layers => {
                    if let Some(l) = self.layers.get(self.layer_sel) {
                        return vec![Effect::LoadLayer(l.name.clone())];
                    }
                }
                Screen::Neurons => {
                    if let Some(n) = self.selected_neuron() {
                        if self.neurons[n].status.is_some() {
                            return vec![Effect::ShowStored(n)];
                        }
                        return self.describe(n, false);
                    }
                }
                Screen::Run | Screen::Setup => {}
            },
            Action::Rerun => {
                if let (Screen::Run, Some(r)) = (self.screen, &self.run) {
                    let c = &self.current;
                    self.form = Some(Form {
                        neuron: r.neuron,
                        preset: c.preset,
                        numbers: [
                            c.candidates.to_string(),
                            c.steps.to_string(),
                            c.seed.to_string(),
                        ],
                        field: 0,
                    });
                }
            }
            Action::Back => match self.screen {
                Screen::Run if self.busy => return vec![Effect::Cancel],
                Screen::Run => self.screen = Screen::Neurons,
                Screen::Neurons => self.screen = Screen::Layers,
                Screen::Layers => self.screen = Screen::Targets,
                Screen::Targets | Screen::Setup => {}
            },
            Action::NextUndescribed if self.screen == Screen::Neurons => {
                let start = self.selected_neuron().map_or(0, |n| n + 1);
                let next = (start..self.neurons.len())
                    .chain(0..start)
                    .find(|&n| self.neurons[n].status != Some(Status::Described));
                match next {
                    Some(n) => {
                        self.filter.clear();
                        self.neuron_sel = n;
                    }
                    None => self.notice = Some("every neuron of this layer is described".into()),
                }
            }
            Action::StartJump if self.screen == Screen::Neurons => {
                self.prompt = Some(Prompt::Jump(String::new()))
            }
            Action::StartFilter if self.screen == Screen::Neurons => {
                self.prompt = Some(Prompt::Filter(self.filter.clone()))
            }
            Action::Accept => return self.curate(Curation::Accept),
            Action::Reject => return self.curate(Curation::Reject),
            Action::StartEdit => {
                if let Some(n) = self.curatable() {
                    let current = self.neurons.get(n).and_then(|r| r.label.clone());
                    self.prompt = Some(Prompt::Edit(current.unwrap_or_default()));
                }
            }
            Action::Choose(i) => {
                let concept = self
                    .run
                    .as_ref()
                    .and_then(|r| r.scores.get(i))
                    .map(|s| s.concept.clone());
                if let Some(c) = concept {
                    return self.curate(Curation::Edit(c));
                }
            }
            _ => {}
        }
        Vec::new()
    }

    /// Folds a pipeline event into the state.
    pub fn on_event(&mut self, event: Event) {
        if let Event::JobFinished(r) = &event {
            self.busy = false;
            // Synthesis that took no time is explained: its images were copied.
            if let Some(s) = r.as_ref().ok().filter(|s| s.images_reused > 0) {
                self.notice = Some(format!(
                    "{} of {} synthetic images copied from those made before for the same concepts",
                    s.images_reused,
                    s.images_made + s.images_reused
                ));
            }
            if let Err(e) = r {
                self.notice = Some(if e == "cancelled" {
                    "run cancelled".into()
                } else {
                    format!("run failed: {e}")
                });
                if let Some(run) = &mut self.run {
                    for s in run.stages.values_mut() {
                        if matches!(s, StageState::Running { .. }) {
                            *s = StageState::Waiting;
                        }
                    }
                }
            }
            return;
        }
        if let Event::Finished {
            neuron,
            description,
        } = &event
        {
            if let Some(row) = self.neurons.get_mut(*neuron) {
                row.status = Some(description.status);
                row.review = Review::Unreviewed;
                row.label = description.labels.first().map(|l| l.label.clone());
            }
            if let Some(l) = self.layers.iter_mut().find(|l| l.name == description.layer) {
                match description.status {
                    Status::Described => l.described += 1,
                    Status::Failed => l.failed += 1,
                }
            }
        }
        if let Event::Warning { message } = &event {
            self.notice = Some(message.clone());
        }
        let Some(run) = &mut self.run else { return };
        match event {
            Event::Activations { done, total } => run.activations = Some((done, total)),
            Event::StageStarted { neuron, stage } if neuron == run.neuron => {
                run.stages.insert(
                    stage,
                    StageState::Running {
                        since: std::time::Instant::now(),
                    },
                );
            }
            Event::StageFinished {
                neuron,
                stage,
                seconds,
            } if neuron == run.neuron => {
                run.stages.insert(stage, StageState::Done(seconds));
            }
            Event::TopImages { neuron, images } if neuron == run.neuron => run.top = images,
            Event::Caption {
                neuron,
                index,
                text,
            } if neuron == run.neuron => {
                if run.captions.len() <= index {
                    run.captions.resize(index + 1, String::new());
                }
                run.captions[index] = text;
            }
            Event::LlmText { neuron, text, .. } if neuron == run.neuron => {
                run.streaming.push_str(&text);
            }
            Event::Simplified {
                neuron,
                index,
                text,
            } if neuron == run.neuron => {
                run.simplified.insert(index, text);
                run.streaming.clear();
            }
            Event::Summary {
                neuron,
                index,
                text,
            } if neuron == run.neuron => {
                run.summaries.insert(index, text);
                run.streaming.clear();
            }
            Event::Candidates { neuron, candidates } if neuron == run.neuron => {
                run.candidates = candidates;
                run.streaming.clear();
            }
            Event::Synthetic {
                neuron,
                concept,
                files,
            } if neuron == run.neuron => run.synthetic.push((concept, files)),
            Event::Scores { neuron, scores } if neuron == run.neuron => run.scores = scores,
            Event::Finished {
                neuron,
                description,
            } if neuron == run.neuron => {
                if description.status == Status::Failed {
                    self.notice = Some(format!(
                        "neuron {neuron} failed: {}",
                        description.error.as_deref().unwrap_or("unknown")
                    ));
                }
                run.description = Some(*description);
            }
            _ => {}
        }
    }
}

pub fn status_name(s: Option<Status>) -> &'static str {
    match s {
        None => "undescribed",
        Some(Status::Described) => "described",
        Some(Status::Failed) => "failed",
    }
}

/// The status shown for a neuron: its review once reviewed, else its pipeline status.
pub fn neuron_state(r: &NeuronRow) -> &'static str {
    match r.review {
        Review::Unreviewed => status_name(r.status),
        other => other.as_str(),
    }
}
