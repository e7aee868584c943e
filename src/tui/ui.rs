//! Drawing: a pure function of the state (plus the thumbnail cache).

use std::path::Path;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Block, Borders, Cell, Clear, List, ListItem, ListState, Paragraph, Row, Table, Wrap,
};
use ratatui::Frame;

use super::app::{
    neuron_state, App, Form, Phase, Prompt, RunView, Screen, Setup, StageState, FORM_FIELDS,
};
use super::images::{Thumb, Thumbs};
use super::theme::Theme;
use crate::hub::human_bytes;
use crate::pipeline::Stage;

/// The smallest terminal the layout is made for.
pub const MIN_SIZE: (u16, u16) = (80, 24);

/// Where image files live: probing images and the store's own images.
pub struct Roots<'a> {
    pub probe: &'a Path,
    pub store: &'a Path,
}

/// Where the rows of the list shown were drawn, so a click can pick one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListArea {
    /// The rows, without borders or header.
    pub rows: Rect,
    /// The index of the row drawn first (the list may be scrolled).
    pub first: usize,
}

/// Draws the state; returns where the list shown (if any) went.
pub fn draw(
    f: &mut Frame,
    app: &App,
    theme: &Theme,
    thumbs: &mut Thumbs,
    roots: &Roots,
) -> Option<ListArea> {
    let area = f.area();
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        let msg = format!(
            "dnd needs a terminal of at least {}x{} (this one is {}x{}).\nMake it larger, or press q to quit.",
            MIN_SIZE.0, MIN_SIZE.1, area.width, area.height
        );
        f.render_widget(
            Paragraph::new(msg)
                .style(theme.text)
                .wrap(Wrap { trim: true }),
            area,
        );
        return None;
    }
    let [top, main, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    f.render_widget(Paragraph::new(title(app)).style(theme.title), top);
    let list = match app.screen {
        Screen::Setup => {
            if let Some(s) = &app.setup {
                setup(f, s, theme, main);
            }
            None
        }
        Screen::Targets => Some(targets(f, app, theme, main)),
        Screen::Layers => Some(layers(f, app, theme, main)),
        Screen::Neurons => Some(neurons(f, app, theme, main)),
        Screen::Run => {
            if let Some(run) = &app.run {
                run_view(f, run, theme, thumbs, roots, main)
            }
            None
        }
    };
    f.render_widget(status_line(app, theme), bottom);
    if let Some(form) = &app.form {
        rerun_form(f, form, theme, area);
    }
    if app.help {
        help(f, theme, area);
    }
    list.filter(|_| app.form.is_none() && !app.help)
}

fn title(app: &App) -> String {
    if app.screen == Screen::Setup {
        return " dnd — set-up: models and LLM".into();
    }
    let mut t = format!(" dnd — {}", app.target);
    if let Some(l) = &app.layer {
        t.push_str(&format!(" › {l}"));
    }
    if let (Screen::Run, Some(r)) = (app.screen, &app.run) {
        t.push_str(&format!(" › neuron {}", r.neuron));
    }
    if app.busy {
        t.push_str("   [running]");
    }
    t
}

fn status_line<'a>(app: &'a App, theme: &Theme) -> Paragraph<'a> {
    if let Some(p) = &app.prompt {
        let (what, text) = match p {
            Prompt::Jump(t) => ("go to neuron", t),
            Prompt::Filter(t) => ("filter (label or status)", t),
            Prompt::Edit(t) => ("new label", t),
            Prompt::LlmUrl(t) => ("LLM endpoint URL (up to /v1)", t),
            Prompt::LlmModel(t) => ("LLM model name", t),
        };
        return Paragraph::new(format!(" {what}: {text}█   Enter done · Esc cancel"))
            .style(theme.accent);
    }
    if let Some(n) = &app.notice {
        return Paragraph::new(format!(" {n}")).style(theme.warning);
    }
    if app.form.is_some() {
        return Paragraph::new(" ↑↓ field · ←→ preset · digits edit · Enter re-run · Esc cancel")
            .style(theme.dim);
    }
    let keys = match app.screen {
        Screen::Setup => match app.setup.as_ref().map(|s| &s.phase) {
            Some(Phase::Downloading { .. } | Phase::Loading | Phase::Checking) => "q quit",
            _ => "d download missing · Enter check again · u URL · m model · l API/local · ? help · q quit",
        },
        Screen::Targets => "↑↓ move · Enter open (another target loads its models) · ? help · q quit",
        Screen::Layers => "↑↓ move · Enter open · Esc targets · ? help · q quit",
        Screen::Neurons => {
            "↑↓ move · Enter run/show · g go to · n next undescribed · / filter · Esc back · ? help"
        }
        Screen::Run => {
            "a accept · e edit · r reject · 1-9 choose · R re-run · Esc cancel/back · ? help"
        }
    };
    Paragraph::new(format!(" {keys}")).style(theme.dim)
}

fn block<'a>(title: &'a str, theme: &Theme) -> Block<'a> {
    Block::default()
        .borders(Borders::ALL)
        .border_style(theme.border)
        .title(Span::styled(format!(" {title} "), theme.title))
}

fn targets(f: &mut Frame, app: &App, theme: &Theme, area: Rect) -> ListArea {
    let rows = app.targets.iter().map(|t| {
        Row::new([
            t.name.clone(),
            t.described.to_string(),
            if t.loaded { "loaded" } else { "" }.to_string(),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Min(30),
            Constraint::Length(10),
            Constraint::Length(8),
        ],
    )
    .header(Row::new(["target network", "described", ""]).style(theme.header))
    .block(block(
        "targets (the loaded one, and those with stored results)",
        theme,
    ))
    .row_highlight_style(theme.selected)
    .style(theme.text);
    table_list(f, table, app.target_sel, area)
}

/// Draws a table with a header row and its selection; where its rows went.
fn table_list(f: &mut Frame, table: Table, selected: usize, area: Rect) -> ListArea {
    let mut state = ratatui::widgets::TableState::default().with_selected(Some(selected));
    f.render_stateful_widget(table, area, &mut state);
    let inner = Block::default().borders(Borders::ALL).inner(area);
    ListArea {
        // The header takes the first row.
        rows: Rect {
            y: inner.y + 1,
            height: inner.height.saturating_sub(1),
            ..inner
        },
        first: state.offset(),
    }
}

fn layers(f: &mut Frame, app: &App, theme: &Theme, area: Rect) -> ListArea {
    let header = Row::new([
        "layer",
        "neurons",
        "described",
        "accepted",
        "edited",
        "rejected",
        "failed",
    ])
    .style(theme.header);
    let rows = app.layers.iter().map(|l| {
        Row::new([
            l.name.clone(),
            l.neurons.to_string(),
            l.described.to_string(),
            l.accepted.to_string(),
            l.edited.to_string(),
            l.rejected.to_string(),
            l.failed.to_string(),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Min(16),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(9),
            Constraint::Length(7),
            Constraint::Length(9),
            Constraint::Length(7),
        ],
    )
    .header(header)
    .block(block("layers", theme))
    .row_highlight_style(theme.selected)
    .style(theme.text);
    table_list(f, table, app.layer_sel, area)
}

fn neurons(f: &mut Frame, app: &App, theme: &Theme, area: Rect) -> ListArea {
    let visible = app.visible();
    let items: Vec<ListItem> = visible
        .iter()
        .map(|r| {
            let style = match r.status {
                None => theme.dim,
                Some(crate::store::Status::Described) => theme.text,
                Some(crate::store::Status::Failed) => theme.warning,
            };
            ListItem::new(Line::from(vec![
                Span::styled(format!("{:>6}  ", r.neuron), theme.accent),
                Span::styled(format!("{:<12}", neuron_state(r)), style),
                Span::styled(r.label.clone().unwrap_or_default(), theme.text),
            ]))
        })
        .collect();
    let title = if app.filter.is_empty() {
        format!("neurons ({})", app.neurons.len())
    } else {
        format!(
            "neurons matching {:?} ({} of {})",
            app.filter,
            visible.len(),
            app.neurons.len()
        )
    };
    let list = List::new(items)
        .block(block(&title, theme))
        .highlight_style(theme.selected);
    let mut state = ListState::default().with_selected(Some(app.neuron_sel));
    f.render_stateful_widget(list, area, &mut state);
    ListArea {
        rows: Block::default().borders(Borders::ALL).inner(area),
        first: state.offset(),
    }
}

fn setup(f: &mut Frame, s: &Setup, theme: &Theme, area: Rect) {
    let [models_area, llm_area, next_area] = Layout::vertical([
        Constraint::Length(s.models.len().max(1) as u16 + 3),
        Constraint::Length(7),
        Constraint::Min(0),
    ])
    .areas(area);
    let rows = s.models.iter().map(|m| {
        let (status, style) = if m.missing.is_empty() {
            ("on disk".to_string(), theme.text)
        } else {
            (
                format!("missing {} file(s)", m.missing.len()),
                theme.warning,
            )
        };
        let size = if !m.missing.is_empty() && !s.sizes_known && !s.offline {
            "asking the Hub…".to_string()
        } else {
            m.size(s.offline)
        };
        Row::new([
            Cell::from(m.role.setting()),
            Cell::from(m.source.to_string()),
            Cell::from(status),
            Cell::from(size),
        ])
        .style(style)
    });
    f.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(12),
                Constraint::Min(30),
                Constraint::Length(18),
                Constraint::Length(26),
            ],
        )
        .header(Row::new(["model", "source", "status", "size"]).style(theme.header))
        .block(block("models", theme))
        .style(theme.text),
        models_area,
    );

    let l = &s.llm;
    let mut lines = if l.local {
        vec![
            kv("using", "a local model (l: use an endpoint instead)", theme),
            kv("model", &l.local_model, theme),
        ]
    } else {
        let key = if l.key_set {
            "set (never shown)"
        } else {
            "not set (OpenAI needs one, most local servers not): export OPENAI_API_KEY=… before dnd starts"
        };
        vec![
            kv(
                "using",
                "an OpenAI-compatible endpoint (l: use a local model instead)",
                theme,
            ),
            kv("URL", &format!("{}   (u: edit)", l.url), theme),
            kv("model", &format!("{}   (m: edit)", l.model), theme),
            kv("API key", key, theme),
        ]
    };
    if let Some(p) = &l.problem {
        lines.push(Line::styled(
            format!(" ! {}", p.lines().next().unwrap_or_default()),
            theme.warning,
        ));
    }
    f.render_widget(
        Paragraph::new(lines)
            .block(block("LLM for candidate concepts", theme))
            .wrap(Wrap { trim: false }),
        llm_area,
    );

    let missing: Vec<_> = s.models.iter().filter(|m| !m.missing.is_empty()).collect();
    let mut next: Vec<Line> = Vec::new();
    match &s.phase {
        Phase::Checking => next.push(Line::styled(" looking for the models on disk…", theme.text)),
        Phase::Loading => next.push(Line::styled(
            " every file is on disk: loading the models…",
            theme.accent,
        )),
        Phase::Downloading { file, done, total } => {
            let pct = if *total > 0 {
                *done as f64 * 100.0 / *total as f64
            } else {
                0.0
            };
            next.push(Line::styled(
                format!(
                    " downloading {file}: {} of {} ({pct:.0}%)",
                    human_bytes(*done),
                    human_bytes(*total)
                ),
                theme.accent,
            ));
        }
        Phase::Waiting | Phase::Failed(_) => {
            if let Phase::Failed(why) = &s.phase {
                next.extend(
                    why.lines()
                        .map(|l| Line::styled(format!(" {}", l.trim()), theme.warning)),
                );
            }
            if !missing.is_empty() {
                let unreachable = s.sizes_known && missing.iter().all(|m| m.remote_bytes.is_none());
                let what = if s.offline {
                    " dnd is offline (--offline or HF_HUB_OFFLINE): nothing can be downloaded."
                        .to_string()
                } else if unreachable {
                    " The Hugging Face Hub cannot be reached from this machine (no network?), so nothing can be downloaded here."
                        .to_string()
                } else {
                    let bytes: u64 = missing.iter().filter_map(|m| m.remote_bytes).sum();
                    let size = if bytes > 0 {
                        format!(" ({})", human_bytes(bytes))
                    } else {
                        String::new()
                    };
                    format!(
                        " d downloads the {} missing model(s){size} into the Hugging Face cache ($HF_HOME/hub).",
                        missing.len()
                    )
                };
                next.push(Line::styled(what, theme.warning));
            }
            if let Some(p) = &l.problem {
                next.push(Line::styled(
                    " The LLM endpoint cannot be used as set: edit it (u, m), or press l for a local model.",
                    theme.warning,
                ));
                next.extend(
                    p.lines()
                        .skip(1)
                        .map(|x| Line::styled(format!("  {}", x.trim()), theme.dim)),
                );
            }
        }
    }
    if let Some(m) = missing.first() {
        let key = m.role.setting();
        next.extend([
            Line::raw(""),
            Line::styled(
                " Model files already on this machine? Point dnd at each folder (Hugging Face layout):",
                theme.text,
            ),
            Line::styled(
                format!("   dnd {} /path/to/folder", m.role.flag()),
                theme.accent,
            ),
            Line::styled(
                format!("   or in {}:  {key} = \"/path/to/folder\"", s.settings_file),
                theme.accent,
            ),
            Line::styled(
                " or fetch them where the Hub is reachable (`dnd models fetch`) and copy the Hugging",
                theme.text,
            ),
            Line::styled(" Face cache ($HF_HOME/hub) over. Enter checks again.", theme.text),
        ]);
    }
    f.render_widget(
        Paragraph::new(next)
            .block(block("what next", theme))
            .wrap(Wrap { trim: false }),
        next_area,
    );
}

fn kv<'a>(k: &str, v: &str, theme: &Theme) -> Line<'a> {
    Line::from(vec![
        Span::styled(format!(" {k:<9}"), theme.accent),
        Span::styled(v.to_string(), theme.text),
    ])
}

fn rerun_form(f: &mut Frame, form: &Form, theme: &Theme, area: Rect) {
    let values = [
        format!("◀ {} ▶", form.preset),
        form.numbers[0].clone(),
        form.numbers[1].clone(),
        form.numbers[2].clone(),
    ];
    let mut lines: Vec<Line> = FORM_FIELDS
        .iter()
        .zip(values)
        .enumerate()
        .map(|(i, (name, value))| {
            let style = if i == form.field {
                theme.selected
            } else {
                theme.text
            };
            let cursor = if i == form.field && i > 0 { "█" } else { "" };
            Line::styled(format!(" {name:<11} {value}{cursor}"), style)
        })
        .collect();
    lines.push(Line::raw(""));
    lines.push(Line::styled(
        " A preset that names other models loads them first.",
        theme.dim,
    ));
    let w = 56.min(area.width);
    let h = (lines.len() as u16 + 2).min(area.height);
    let popup = Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    };
    f.render_widget(Clear, popup);
    f.render_widget(
        Paragraph::new(lines).block(block(&format!("re-run neuron {}", form.neuron), theme)),
        popup,
    );
}

fn run_view(
    f: &mut Frame,
    run: &RunView,
    theme: &Theme,
    thumbs: &mut Thumbs,
    roots: &Roots,
    area: Rect,
) {
    let [left, right] =
        Layout::horizontal([Constraint::Length(34), Constraint::Min(0)]).areas(area);
    let [stages_area, labels_area] = Layout::vertical([
        Constraint::Length(Stage::ALL.len() as u16 + 2),
        Constraint::Min(0),
    ])
    .areas(left);
    let stage_lines: Vec<Line> = Stage::ALL
        .iter()
        .map(|s| {
            let (mark, note, style) = match run.stages.get(s).cloned().unwrap_or_default() {
                StageState::Waiting => ("·", String::new(), theme.dim),
                StageState::Running { since } => (
                    "▶",
                    format!("{}s {}", since.elapsed().as_secs(), progress(run, *s)),
                    theme.accent,
                ),
                StageState::Done(t) => ("✓", format!("{t:.2}s"), theme.text),
            };
            Line::from(vec![
                Span::styled(format!(" {mark} {:<12}", s.name()), style),
                Span::styled(note, style),
            ])
        })
        .collect();
    f.render_widget(
        Paragraph::new(stage_lines).block(block("stages", theme)),
        stages_area,
    );
    f.render_widget(labels(run, theme), labels_area);

    let [images_area, text_area, synth_area] = Layout::vertical([
        Constraint::Length(7),
        Constraint::Min(6),
        Constraint::Length(7),
    ])
    .areas(right);
    let top_block = block("top images", theme);
    let inner = top_block.inner(images_area);
    f.render_widget(top_block, images_area);
    let top: Vec<Thumb> = run
        .top
        .iter()
        .map(|t| Thumb {
            path: roots.probe.join(&t.image),
            bbox: t.crop.as_ref().map(|c| c.bbox),
        })
        .collect();
    strip(f, thumbs, &top, inner);

    let mut lines: Vec<Line> = Vec::new();
    for (i, c) in run.captions.iter().enumerate() {
        let simple = run
            .simplified
            .get(&i)
            .map(|s| format!("  → {s}"))
            .unwrap_or_default();
        lines.push(Line::from(vec![
            Span::styled(format!("{i:>2} "), theme.dim),
            Span::styled(c.clone(), theme.text),
            Span::styled(simple, theme.accent),
        ]));
    }
    if !run.candidates.is_empty() {
        lines.push(Line::styled(
            format!("candidates: {}", run.candidates.join(" · ")),
            theme.accent,
        ));
    } else if !run.streaming.is_empty() {
        lines.push(Line::styled(format!("LLM: {}", run.streaming), theme.dim));
    }
    f.render_widget(
        Paragraph::new(lines)
            .block(block("captions → concepts", theme))
            .wrap(Wrap { trim: true }),
        text_area,
    );

    let synth_block = block("synthetic images", theme);
    let inner = synth_block.inner(synth_area);
    f.render_widget(synth_block, synth_area);
    let rows = run.synthetic.len().clamp(1, 2) as u16;
    let parts =
        Layout::vertical(vec![Constraint::Length(inner.height / rows); rows as usize]).split(inner);
    for ((concept, files), row) in run.synthetic.iter().zip(parts.iter()) {
        let [name, imgs] =
            Layout::horizontal([Constraint::Length(18), Constraint::Min(0)]).areas(*row);
        f.render_widget(
            Paragraph::new(concept.as_str())
                .style(theme.text)
                .wrap(Wrap { trim: true }),
            name,
        );
        let t: Vec<Thumb> = files
            .iter()
            .map(|p| Thumb {
                path: roots.store.join(p),
                bbox: None,
            })
            .collect();
        strip(f, thumbs, &t, imgs);
    }
}

/// How far a running stage has come, from the events so far.
fn progress(run: &RunView, stage: Stage) -> String {
    let of = |done: usize, total: usize| {
        if total > 0 {
            format!("{done}/{total}")
        } else {
            String::new()
        }
    };
    match stage {
        Stage::Activations => run.activations.map_or(String::new(), |(d, t)| of(d, t)),
        Stage::Captions => of(run.captions.len(), run.top.len()),
        Stage::Synthesis => of(run.synthetic.len(), run.candidates.len()),
        _ => String::new(),
    }
}

/// Thumbnails side by side, as many as fit.
fn strip(f: &mut Frame, thumbs: &mut Thumbs, items: &[Thumb], area: Rect) {
    let w = (area.height * 2).max(4);
    let n = (area.width / (w + 1)) as usize;
    for (i, t) in items.iter().take(n).enumerate() {
        let cell = Rect {
            x: area.x + i as u16 * (w + 1),
            y: area.y,
            width: w,
            height: area.height,
        };
        thumbs.render(t, cell, f.buffer_mut());
    }
}

fn labels<'a>(run: &'a RunView, theme: &Theme) -> Table<'a> {
    let winner = run.description.as_ref().and_then(|d| d.labels.first());
    let title = match (winner, &run.description) {
        (Some(l), _) => format!("label: {}", l.label),
        (None, Some(d)) if d.error.is_some() => "failed".to_string(),
        _ => "scores".to_string(),
    };
    let rows = run.scores.iter().enumerate().map(|(i, s)| {
        let style = if i == 0 { theme.selected } else { theme.text };
        Row::new([
            Cell::from(s.concept.clone()),
            Cell::from(format!("{:.1}", s.rank_score)),
            Cell::from(format!("{:.2}", s.weight)),
            Cell::from(format!("{:.2}", s.final_score)),
        ])
        .style(style)
    });
    Table::new(
        rows,
        [
            Constraint::Min(12),
            Constraint::Length(5),
            Constraint::Length(5),
            Constraint::Length(5),
        ],
    )
    .header(Row::new(["concept", "rank", "clip", "final"]).style(theme.header))
    .block(
        Block::default()
            .borders(Borders::ALL)
            .border_style(theme.border)
            .title(Span::styled(
                format!(" {title} "),
                theme.title.add_modifier(Modifier::BOLD),
            )),
    )
}

fn help(f: &mut Frame, theme: &Theme, area: Rect) {
    let keys = [
        ("↑/k ↓/j", "move"),
        ("Enter", "open a target or layer; run or show a neuron"),
        (
            "Esc",
            "cancel a run / back (up to the targets) / close help",
        ),
        ("g", "go to a neuron by number"),
        ("n", "next neuron without a description"),
        ("/", "filter neurons by label or status"),
        ("a / r", "accept / reject the open neuron's label"),
        ("e", "edit the label (Enter saves, Esc cancels)"),
        ("1-9", "take that row of the score table as the label"),
        ("R", "re-run with other preset, candidates, steps, seed"),
        ("mouse", "click selects a row, a second click opens it"),
        ("d", "set-up: download the missing models"),
        ("u / m / l", "set-up: LLM URL / model / API or local"),
        ("?", "this help"),
        ("q", "quit (asks first while a run is in flight)"),
    ];
    let lines: Vec<Line> = keys
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!(" {k:<10}"), theme.accent),
                Span::styled(*what, theme.text),
            ])
        })
        .collect();
    let w = 66.min(area.width);
    let h = (lines.len() as u16 + 2).min(area.height);
    let popup = Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    };
    f.render_widget(Clear, popup);
    f.render_widget(
        Paragraph::new(lines)
            .block(block("keys", theme))
            .style(Style::default()),
        popup,
    );
}
