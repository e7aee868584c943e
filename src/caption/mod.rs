//! Captioning (METHOD step 2.1): one caption per top image, greedy, batched.

mod blip;

pub use blip::{Blip, Config, Generation};

/// Tokenizer debris and BLIP's habitual filler, removed from captions: "arafed" and kin are
/// artefacts of BLIP's training captions; a leading "there is" adds nothing to a concept.
const DEBRIS: &[&str] = &["arafed", "araffe", "arafly", "arafe", "araf", "[unk]"];

/// Lower-cases, drops debris words and a leading "there is/are", squeezes whitespace.
pub fn clean_caption(raw: &str) -> String {
    let words: Vec<String> = raw
        .split_whitespace()
        .map(str::to_lowercase)
        .filter(|w| !DEBRIS.contains(&w.as_str()))
        .collect();
    let skip = match words.as_slice() {
        [a, b, ..] if a == "there" && (b == "is" || b == "are") => 2,
        _ => 0,
    };
    words[skip..].join(" ")
}

#[cfg(test)]
mod tests {
    use super::clean_caption;

    #[test]
    fn debris_and_filler_go() {
        assert_eq!(clean_caption("arafed dog  on a beach"), "dog on a beach");
        assert_eq!(clean_caption("there is a red car [UNK]"), "a red car");
        assert_eq!(clean_caption("  A Cat "), "a cat");
    }
}
