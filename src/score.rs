//! Best-concept selection (METHOD step 3.2-3.5): rank every synthetic image by the neuron's
//! activation, score each candidate by where its images land, weight by CLIP similarity to
//! the neuron's own top images, and order the candidates.

use serde::{Deserialize, Serialize};

/// How a candidate's image positions become one rank score (lower is better).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "method")]
pub enum RankScore {
    /// Mean of the squares of the first `beta` positions (the reference's default, beta = 5).
    TopkSqMean {
        beta: usize,
    },
    Mean,
    Median,
    SqMean,
}

impl RankScore {
    pub fn parse(name: &str, beta: usize) -> Option<Self> {
        Some(match name {
            "topk-sq-mean" => Self::TopkSqMean { beta },
            "mean" => Self::Mean,
            "median" => Self::Median,
            "sq-mean" => Self::SqMean,
            _ => return None,
        })
    }

    /// The score of ascending 0-based `positions`; `n_candidates + 1` when there are none.
    pub fn score(&self, positions: &[usize], n_candidates: usize) -> f64 {
        if positions.is_empty() {
            return (n_candidates + 1) as f64;
        }
        let mean = |it: &mut dyn Iterator<Item = f64>, n: usize| it.sum::<f64>() / n as f64;
        match *self {
            Self::TopkSqMean { beta } => {
                let k = beta.min(positions.len()).max(1);
                mean(&mut positions[..k].iter().map(|&p| (p * p) as f64), k)
            }
            Self::Mean => mean(&mut positions.iter().map(|&p| p as f64), positions.len()),
            Self::SqMean => mean(
                &mut positions.iter().map(|&p| (p * p) as f64),
                positions.len(),
            ),
            Self::Median => {
                let n = positions.len();
                if n % 2 == 1 {
                    positions[n / 2] as f64
                } else {
                    (positions[n / 2 - 1] + positions[n / 2]) as f64 / 2.0
                }
            }
        }
    }
}

/// Where each candidate's synthetic images land when all of them are sorted by activation.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranking {
    /// Per candidate: ascending 0-based positions of its images in the overall order.
    pub positions: Vec<Vec<usize>>,
    /// Per candidate: indices (into its own images) of those in the overall top `top`.
    pub in_top: Vec<Vec<usize>>,
}

/// Ranks the synthetic images: `activations[c][i]` is the neuron's pooled activation on image
/// `i` of candidate `c`. Equal activations keep candidate order (a stable sort, as torch's).
pub fn rank(activations: &[Vec<f32>], top: usize) -> Ranking {
    let mut all: Vec<(usize, usize, f32)> = activations
        .iter()
        .enumerate()
        .flat_map(|(c, acts)| acts.iter().enumerate().map(move |(i, &a)| (c, i, a)))
        .collect();
    all.sort_by(|a, b| b.2.total_cmp(&a.2));
    let mut positions = vec![Vec::new(); activations.len()];
    let mut in_top = vec![Vec::new(); activations.len()];
    for (pos, &(c, i, _)) in all.iter().enumerate() {
        positions[c].push(pos);
        if pos < top {
            in_top[c].push(i);
        }
    }
    Ranking { positions, in_top }
}

/// Mean cosine similarity over all pairs of `probe` and `synthetic` embeddings; -1 when
/// `synthetic` is empty (the candidate has no image in the top).
pub fn clip_weight(probe: &[Vec<f32>], synthetic: &[Vec<f32>]) -> f64 {
    if synthetic.is_empty() || probe.is_empty() {
        return -1.0;
    }
    let unit = |v: &Vec<f32>| {
        let n = v
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        v.iter().map(|x| f64::from(*x) / n).collect::<Vec<f64>>()
    };
    let p: Vec<Vec<f64>> = probe.iter().map(unit).collect();
    let s: Vec<Vec<f64>> = synthetic.iter().map(unit).collect();
    let total: f64 = p
        .iter()
        .flat_map(|a| {
            s.iter()
                .map(move |b| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>())
        })
        .sum();
    total / (p.len() * s.len()) as f64
}

/// One candidate's scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Index into the candidate list.
    pub candidate: usize,
    pub rank_score: f64,
    pub weight: f64,
    pub final_score: f64,
}

/// Step 3.5: order by rank score (best first; ties by candidate index), concept_rank =
/// n - position, final = concept_rank x weight, sorted descending. Equal final scores put the
/// later candidate first, as the reference's `sort(reverse=True)` over (score, index) does.
pub fn combine(rank_scores: &[f64], weights: &[f64]) -> Vec<Scored> {
    assert_eq!(rank_scores.len(), weights.len());
    let n = rank_scores.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| rank_scores[a].total_cmp(&rank_scores[b]).then(a.cmp(&b)));
    let mut scored: Vec<Scored> = order
        .iter()
        .enumerate()
        .map(|(pos, &c)| Scored {
            candidate: c,
            rank_score: rank_scores[c],
            weight: weights[c],
            final_score: (n - pos) as f64 * weights[c],
        })
        .collect();
    scored.sort_by(|a, b| {
        b.final_score
            .total_cmp(&a.final_score)
            .then(b.candidate.cmp(&a.candidate))
    });
    scored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_scores_by_hand() {
        let p = [0, 2, 3, 7, 9, 11];
        assert_eq!(
            RankScore::TopkSqMean { beta: 5 }.score(&p, 5),
            (0. + 4. + 9. + 49. + 81.) / 5.
        );
        assert_eq!(
            RankScore::TopkSqMean { beta: 5 }.score(&[4, 6], 5),
            (16. + 36.) / 2.
        );
        assert_eq!(RankScore::Mean.score(&p, 5), 32.0 / 6.0);
        assert_eq!(RankScore::SqMean.score(&[1, 3], 5), 5.0);
        assert_eq!(RankScore::Median.score(&p, 5), 5.0);
        assert_eq!(RankScore::Median.score(&[1, 2, 9], 5), 2.0);
        assert_eq!(RankScore::Mean.score(&[], 5), 6.0);
    }

    #[test]
    fn ranking_by_hand() {
        // candidate 0: 0.9, 0.1; candidate 1: 0.5, 0.95; candidate 2: 0.2
        let r = rank(&[vec![0.9, 0.1], vec![0.5, 0.95], vec![0.2]], 2);
        assert_eq!(r.positions, vec![vec![1, 4], vec![0, 2], vec![3]]);
        assert_eq!(r.in_top, vec![vec![0], vec![1], vec![]]);
    }

    #[test]
    fn clip_weight_by_hand() {
        let probe = vec![vec![1.0, 0.0], vec![0.0, 2.0]];
        // cos with (1,1): 0.7071 and 0.7071; with (1,0): 1 and 0
        let w = clip_weight(&probe, &[vec![1.0, 1.0], vec![3.0, 0.0]]);
        assert!((w - (2.0 * 0.5f64.sqrt() + 1.0) / 4.0).abs() < 1e-9);
        assert_eq!(clip_weight(&probe, &[]), -1.0);
    }

    #[test]
    fn combine_by_hand() {
        // rank order: c1 (2.0), c0 (5.0), c2 (9.0) -> concept ranks 3, 2, 1
        let s = combine(&[5.0, 2.0, 9.0], &[0.9, 0.2, 0.8]);
        let got: Vec<(usize, f64)> = s.iter().map(|s| (s.candidate, s.final_score)).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0, 0);
        assert!((got[0].1 - 1.8).abs() < 1e-12);
        assert_eq!(got[1].0, 2);
        assert!((got[1].1 - 0.8).abs() < 1e-12);
        assert_eq!(got[2].0, 1);
        assert!((got[2].1 - 0.6).abs() < 1e-12);
        // a candidate without top images (-1) sinks below every positive one
        let s = combine(&[1.0, 2.0], &[-1.0, 0.1]);
        assert_eq!(s[0].candidate, 1);
    }
}
