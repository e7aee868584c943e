//! Colours, from `themes/*.toml` (built in) or a file of the same shape; `NO_COLOR` turns
//! colour off and keeps only reverse video for the selection.

use std::path::Path;

use ratatui::style::{Color, Modifier, Style};

const BUILT_IN: [(&str, &str); 3] = [
    ("dark", include_str!("../../themes/dark.toml")),
    ("light", include_str!("../../themes/light.toml")),
    (
        "high-contrast",
        include_str!("../../themes/high-contrast.toml"),
    ),
];

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StyleSpec {
    fg: Option<String>,
    bg: Option<String>,
    #[serde(default)]
    bold: bool,
    #[serde(default)]
    reversed: bool,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    title: StyleSpec,
    text: StyleSpec,
    dim: StyleSpec,
    accent: StyleSpec,
    warning: StyleSpec,
    header: StyleSpec,
    selected: StyleSpec,
    border: StyleSpec,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Theme {
    pub title: Style,
    pub text: Style,
    pub dim: Style,
    pub accent: Style,
    pub warning: Style,
    pub header: Style,
    pub selected: Style,
    pub border: Style,
}

impl Theme {
    /// A built-in theme by name (dark, light, high-contrast) or a TOML file.
    pub fn load(name: &str, no_color: bool) -> Result<Self, String> {
        if no_color {
            return Ok(Self::plain());
        }
        let text = match BUILT_IN.iter().find(|(n, _)| *n == name) {
            Some((_, t)) => t.to_string(),
            None if Path::new(name).is_file() => {
                std::fs::read_to_string(name).map_err(|e| format!("theme {name}: {e}"))?
            }
            None => {
                return Err(format!(
                    "theme {name:?}: not a built-in theme (dark, light, high-contrast) nor a file"
                ))
            }
        };
        let spec: Spec = toml::from_str(&text).map_err(|e| format!("theme {name}: {e}"))?;
        let style = |s: &StyleSpec| -> Result<Style, String> {
            let color = |c: &Option<String>| -> Result<Option<Color>, String> {
                c.as_deref()
                    .map(|c| {
                        c.parse::<Color>()
                            .map_err(|_| format!("theme {name}: {c:?} is not a colour"))
                    })
                    .transpose()
            };
            let mut st = Style::default();
            if let Some(fg) = color(&s.fg)? {
                st = st.fg(fg);
            }
            if let Some(bg) = color(&s.bg)? {
                st = st.bg(bg);
            }
            if s.bold {
                st = st.add_modifier(Modifier::BOLD);
            }
            if s.reversed {
                st = st.add_modifier(Modifier::REVERSED);
            }
            Ok(st)
        };
        Ok(Self {
            title: style(&spec.title)?,
            text: style(&spec.text)?,
            dim: style(&spec.dim)?,
            accent: style(&spec.accent)?,
            warning: style(&spec.warning)?,
            header: style(&spec.header)?,
            selected: style(&spec.selected)?,
            border: style(&spec.border)?,
        })
    }

    /// No colour at all (NO_COLOR); the selection stays visible in reverse video.
    pub fn plain() -> Self {
        let none = Style::default();
        Self {
            title: none.add_modifier(Modifier::BOLD),
            text: none,
            dim: none,
            accent: none,
            warning: none.add_modifier(Modifier::BOLD),
            header: none.add_modifier(Modifier::BOLD),
            selected: none.add_modifier(Modifier::REVERSED),
            border: none,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_theme_loads_and_bad_ones_are_named() {
        for (name, _) in BUILT_IN {
            Theme::load(name, false).unwrap();
        }
        assert_eq!(Theme::load("dark", true).unwrap(), Theme::plain());
        assert!(Theme::load("nope", false).unwrap_err().contains("nope"));
    }
}
