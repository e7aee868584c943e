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
    Event as TermEvent, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers,
};
use futures::StreamExt;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::pipeline::{Description, Event, Job, Params};
use crate::store::Store;
use app::{Action, App, Effect};
use images::Thumbs;
use theme::Theme;

/// Everything the UI needs besides the engine.
pub struct Session {
    pub app: App,
    pub engine: Engine,
    pub events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    pub store: Arc<Store>,
    pub params: Params,
    pub theme: Theme,
    pub thumbs: Thumbs,
    pub probe_root: PathBuf,
    /// Neurons per layer, by name.
    pub layer_sizes: Vec<(String, usize)>,
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
        _ => return None,
    })
}

impl Session {
    fn carry_out(&mut self, effect: Effect) -> Result<bool> {
        match effect {
            Effect::Quit => return Ok(false),
            Effect::Cancel => self.engine.cancel(),
            Effect::LoadLayer(layer) => {
                let count = self
                    .layer_sizes
                    .iter()
                    .find(|(n, _)| *n == layer)
                    .map_or(0, |(_, c)| *c);
                let rows = self.store.rows(Some(&self.app.target), Some(&layer))?;
                self.app.set_neurons(&layer, count, &rows);
            }
            Effect::ShowStored(n) => {
                let layer = self.app.layer.clone().unwrap_or_default();
                let rows = self.store.rows(Some(&self.app.target), Some(&layer))?;
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
                    .store
                    .curate(&self.app.target, &layer, neuron, &decision)?;
                self.app.curated(&row);
            }
            Effect::Describe { neuron, force } => self.engine.submit(Job {
                layer: self.app.layer.clone().unwrap_or_default(),
                neurons: vec![neuron],
                params: self.params.clone(),
                force,
            }),
        }
        Ok(true)
    }

    /// Applies `action` as if it had been typed (for `--layer` / `--neuron`).
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
        let result = self.event_loop(&mut terminal).await;
        ratatui::restore();
        result
    }

    async fn event_loop(&mut self, terminal: &mut ratatui::DefaultTerminal) -> Result<()> {
        let mut keys = EventStream::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let store_root = self.store.images_root().to_path_buf();
        let mut dirty = true;
        loop {
            if dirty {
                let roots = ui::Roots {
                    probe: &self.probe_root,
                    store: &store_root,
                };
                let (app, theme, thumbs) = (&self.app, &self.theme, &mut self.thumbs);
                terminal
                    .draw(|f| ui::draw(f, app, theme, thumbs, &roots))
                    .map_err(|e| Error::io("terminal", e))?;
                dirty = false;
            }
            tokio::select! {
                key = keys.next() => match key {
                    Some(Ok(TermEvent::Key(k))) => {
                        if let Some(a) = action_for(k, self.app.prompt.is_some()) {
                            self.app.notice = None;
                            for effect in self.app.update(a) {
                                match self.carry_out(effect) {
                                    Ok(true) => {}
                                    Ok(false) => return Ok(()),
                                    // A store that cannot be read or written is shown, and
                                    // the UI stays up (nothing is lost by quitting later).
                                    Err(e) => self.app.notice = Some(e.to_string()),
                                }
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
                _ = tick.tick() => dirty |= self.thumbs.poll(),
            }
        }
    }
}
