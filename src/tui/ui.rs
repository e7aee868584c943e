//! Drawing: a pure function of the state (plus the thumbnail cache).

use std::path::Path;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Block, Borders, Cell, Clear, List, ListItem, ListState, Paragraph, Row, Table, Wrap,
};
use ratatui::Frame;

use super::app::{neuron_state, App, Prompt, RunView, Screen, StageState};
use super::images::{Thumb, Thumbs};
use super::theme::Theme;
use crate::pipeline::Stage;

/// The smallest terminal the layout is made for.
pub const MIN_SIZE: (u16, u16) = (80, 24);

/// Where image files live: probing images and the store's own images.
pub struct Roots<'a> {
    pub probe: &'a Path,
    pub store: &'a Path,
}

pub fn draw(f: &mut Frame, app: &App, theme: &Theme, thumbs: &mut Thumbs, roots: &Roots) {
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
        return;
    }
    let [top, main, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    f.render_widget(Paragraph::new(title(app)).style(theme.title), top);
    match app.screen {
        Screen::Layers => layers(f, app, theme, main),
        Screen::Neurons => neurons(f, app, theme, main),
        Screen::Run => {
            if let Some(run) = &app.run {
                run_view(f, run, theme, thumbs, roots, main)
            }
        }
    }
    f.render_widget(status_line(app, theme), bottom);
    if app.help {
        help(f, theme, area);
    }
}

fn title(app: &App) -> String {
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
        };
        return Paragraph::new(format!(" {what}: {text}█   Enter done · Esc cancel"))
            .style(theme.accent);
    }
    if let Some(n) = &app.notice {
        return Paragraph::new(format!(" {n}")).style(theme.warning);
    }
    let keys = match app.screen {
        Screen::Layers => "↑↓ move · Enter open · ? help · q quit",
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

fn layers(f: &mut Frame, app: &App, theme: &Theme, area: Rect) {
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
    let mut state = ratatui::widgets::TableState::default().with_selected(Some(app.layer_sel));
    f.render_stateful_widget(table, area, &mut state);
}

fn neurons(f: &mut Frame, app: &App, theme: &Theme, area: Rect) {
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
                StageState::Running => ("▶", "running".to_string(), theme.accent),
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
        ("Enter", "open a layer; run or show a neuron"),
        ("Esc", "cancel a run / back / close this help"),
        ("g", "go to a neuron by number"),
        ("n", "next neuron without a description"),
        ("/", "filter neurons by label or status"),
        ("a / r", "accept / reject the open neuron's label"),
        ("e", "edit the label (Enter saves, Esc cancels)"),
        ("1-9", "take that row of the score table as the label"),
        ("R", "describe the open neuron again"),
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
    let w = 60.min(area.width);
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
