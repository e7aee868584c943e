//! Diffusion schedulers, as diffusers computes them: Euler discrete (SD-Turbo's), DDIM,
//! DPM-Solver++ 2M (what the reference swaps in; candle has none), UniPC (bh1 / bh2, orders
//! 1 and 2, predicting x0), LMS (Euler's sigmas, fourth-order linear multistep) and PNDM's
//! linear multistep (PLMS: the scheduler of SD 1.x's and 2.x-base's Hub folders), with or
//! without its Runge-Kutta warm-up (diffusers' default, which SD's folders skip). Built from a
//! folder's `scheduler/scheduler_config.json`, with each diffusers class's own defaults for
//! absent keys.

use candle_core::Tensor;
use serde::Deserialize;

use crate::Result;

/// Which solver runs the reverse process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Kind {
    EulerDiscrete,
    Ddim,
    DpmSolverPlusPlus,
    Pndm,
    UniPc,
    Lms,
}

impl Kind {
    /// From a diffusers `_class_name` or a flag value.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "EulerDiscreteScheduler" | "euler" => Self::EulerDiscrete,
            "DDIMScheduler" | "ddim" => Self::Ddim,
            "DPMSolverMultistepScheduler" | "dpm-solver++" | "dpmpp" => Self::DpmSolverPlusPlus,
            "PNDMScheduler" | "pndm" => Self::Pndm,
            "UniPCMultistepScheduler" | "unipc" => Self::UniPc,
            "LMSDiscreteScheduler" | "lms" => Self::Lms,
            _ => return None,
        })
    }
}

fn d_steps() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_linear() -> String {
    "linear".into()
}
fn d_epsilon() -> String {
    "epsilon".into()
}

/// The keys of `scheduler_config.json` that any of them reads.
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "d_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_linear")]
    pub beta_schedule: String,
    #[serde(default = "d_epsilon")]
    pub prediction_type: String,
    /// diffusers' default differs per class (Euler and DPM: linspace, DDIM: leading).
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub steps_offset: usize,
    /// DDIM only; diffusers defaults both to true.
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default)]
    pub clip_sample_range: Option<f64>,
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default)]
    pub algorithm_type: Option<String>,
    #[serde(default)]
    pub solver_order: Option<usize>,
    /// PNDM only; diffusers defaults it to false (Runge-Kutta warm-up steps), SD's folders set
    /// it true.
    #[serde(default)]
    pub skip_prk_steps: Option<bool>,
    /// UniPC only, with diffusers' defaults when absent: bh2, true, true, none.
    #[serde(default)]
    pub solver_type: Option<String>,
    #[serde(default)]
    pub predict_x0: Option<bool>,
    #[serde(default)]
    pub lower_order_final: Option<bool>,
    #[serde(default)]
    pub disable_corrector: Option<Vec<usize>>,
    /// Euler, DPM-Solver++ and UniPC: the last sigma, "zero" (diffusers' default) or
    /// "sigma_min" (the first training timestep's).
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    /// DPM-Solver++: a first-order last step whatever else says.
    #[serde(default)]
    pub euler_at_final: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    V,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

/// A scheduler set to a number of steps; `step` is called once per timestep, in order.
#[derive(Clone, Debug)]
pub struct Scheduler {
    kind: Kind,
    prediction: Prediction,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    /// Euler and DPM-Solver++: one sigma per timestep plus the final one.
    sigmas: Vec<f64>,
    /// DDIM: clip the predicted sample to this range.
    clip: Option<f64>,
    final_alpha: f64,
    step_index: usize,
    /// DPM-Solver++: the previous data prediction and how many low-order steps ran.
    previous: Option<Tensor>,
    /// PNDM: the last four noise predictions (newest last), and the sample its second step
    /// (or each Runge-Kutta step) starts again from.
    outputs: Vec<Tensor>,
    restart: Option<Tensor>,
    /// PNDM's Runge-Kutta warm-up: how many of the first UNet calls it takes (12, or 0 when
    /// skipped), and the weighted sum of a step's predictions so far.
    prk_calls: usize,
    prk_sum: Option<Tensor>,
    /// UniPC: its settings, the sample its last predictor step started from (which the
    /// corrector refines) and that step's order. Its x0 predictions go in `outputs`.
    unipc: Option<UniPcSettings>,
    last_sample: Option<Tensor>,
    order: usize,
    dpm_final_first_order: bool,
    train_steps: usize,
    /// Inference steps asked for (PNDM calls the UNet once more).
    steps: usize,
    spacing: Spacing,
}

fn config_error(detail: String) -> crate::Error {
    crate::Error::Model {
        model: "synthesiser scheduler".into(),
        detail,
    }
}

impl Scheduler {
    /// `kind` overrides the folder's class (as the reference's `from_config` swap does).
    pub fn new(cfg: &SchedulerConfig, kind: Option<Kind>, steps: usize) -> Result<Self> {
        let kind = match kind {
            Some(k) => k,
            None => cfg
                .class_name
                .as_deref()
                .and_then(Kind::parse)
                .ok_or_else(|| {
                    config_error(format!(
                        "scheduler {} is not supported (EulerDiscreteScheduler, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, UniPCMultistepScheduler, LMSDiscreteScheduler); pass --scheduler euler|ddim|dpm-solver++|pndm|unipc|lms",
                        cfg.class_name.as_deref().unwrap_or("(no _class_name)")
                    ))
                })?,
        };
        if steps == 0 {
            return Err(config_error(
                "the number of steps must be at least 1".into(),
            ));
        }
        if cfg.use_karras_sigmas == Some(true) {
            return Err(config_error("Karras sigmas are not supported".into()));
        }
        if kind == Kind::DpmSolverPlusPlus
            && !matches!(cfg.algorithm_type.as_deref(), None | Some("dpmsolver++"))
        {
            return Err(config_error(format!(
                "DPM-Solver algorithm {:?} is not supported (dpmsolver++)",
                cfg.algorithm_type
            )));
        }
        let prk = kind == Kind::Pndm && cfg.skip_prk_steps != Some(true);
        if prk && steps < 4 {
            return Err(config_error(format!(
                "PNDM's Runge-Kutta warm-up (skip_prk_steps false, diffusers' default) spans four steps and cannot run in {steps} (diffusers fails too): pass --steps 4 or more, set \"skip_prk_steps\": true in scheduler/scheduler_config.json as SD's folders do, or pass --scheduler euler|ddim|dpm-solver++|unipc|lms"
            )));
        }
        if kind == Kind::DpmSolverPlusPlus && cfg.solver_order.unwrap_or(2) != 2 {
            return Err(config_error(
                "only DPM-Solver++ of order 2 is supported".into(),
            ));
        }
        let unipc = match kind {
            Kind::UniPc => Some(UniPcSettings::of(cfg)?),
            _ => None,
        };
        let prediction = match cfg.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            other => {
                return Err(config_error(format!(
                    "prediction_type {other:?} is not supported"
                )))
            }
        };
        let n = cfg.num_train_timesteps;
        // diffusers builds betas in float32; so do we, for the same alphas.
        let betas: Vec<f32> = match cfg.beta_schedule.as_str() {
            "scaled_linear" => {
                linspace(cfg.beta_start.sqrt() as f32, cfg.beta_end.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            "linear" => linspace(cfg.beta_start as f32, cfg.beta_end as f32, n),
            other => {
                return Err(config_error(format!(
                    "beta_schedule {other:?} is not supported"
                )))
            }
        };
        let mut acc = 1f32;
        let alphas_cumprod: Vec<f64> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                f64::from(acc)
            })
            .collect();
        let spacing = match cfg.timestep_spacing.as_deref() {
            Some("linspace") => Spacing::Linspace,
            Some("leading") => Spacing::Leading,
            Some("trailing") => Spacing::Trailing,
            None if matches!(kind, Kind::Ddim | Kind::Pndm) => Spacing::Leading,
            None => Spacing::Linspace,
            Some(other) => {
                return Err(config_error(format!(
                    "timestep_spacing {other:?} is not supported"
                )))
            }
        };
        let timesteps = timesteps(kind, spacing, n, steps, cfg.steps_offset, prk);
        let full: Vec<f64> = alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &full)).collect();
        let final_zero = match cfg.final_sigmas_type.as_deref() {
            None | Some("zero") => true,
            Some("sigma_min") => false,
            Some(other) => {
                return Err(config_error(format!(
                    "final_sigmas_type {other:?} is not supported (zero, sigma_min)"
                )))
            }
        };
        sigmas.push(if final_zero { 0.0 } else { full[0] });
        // diffusers' DPM-Solver++ steps last at first order when the final sigma is zero, or
        // asked to, or below 15 steps with lower_order_final.
        let dpm_final_first_order = final_zero
            || cfg.euler_at_final == Some(true)
            || (cfg.lower_order_final.unwrap_or(true) && timesteps.len() < 15);
        Ok(Self {
            kind,
            prediction,
            timesteps,
            sigmas,
            clip: match kind {
                Kind::Ddim if cfg.clip_sample.unwrap_or(true) => {
                    Some(cfg.clip_sample_range.unwrap_or(1.0))
                }
                _ => None,
            },
            // diffusers' default: true for DDIM, false for PNDM.
            final_alpha: if cfg.set_alpha_to_one.unwrap_or(kind != Kind::Pndm) {
                1.0
            } else {
                alphas_cumprod[0]
            },
            alphas_cumprod,
            step_index: 0,
            previous: None,
            outputs: Vec::new(),
            restart: None,
            prk_calls: if prk { PRK_CALLS } else { 0 },
            prk_sum: None,
            unipc,
            last_sample: None,
            order: 0,
            dpm_final_first_order,
            train_steps: n,
            steps,
            spacing,
        })
    }

    /// The timesteps the UNet is called with, in order.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Scale of the initial Gaussian noise.
    pub fn init_noise_sigma(&self) -> f64 {
        match self.kind {
            Kind::EulerDiscrete | Kind::Lms => {
                let max = self.sigmas.iter().cloned().fold(0.0, f64::max);
                match self.spacing {
                    Spacing::Leading => (max * max + 1.0).sqrt(),
                    _ => max,
                }
            }
            _ => 1.0,
        }
    }

    /// The UNet input at the current step.
    pub fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        Ok(match self.kind {
            Kind::EulerDiscrete | Kind::Lms => {
                let s = self.sigmas[self.step_index];
                (sample / (s * s + 1.0).sqrt())?
            }
            _ => sample.clone(),
        })
    }

    /// One reverse step from `sample` with the UNet's `output` at the current timestep.
    pub fn step(&mut self, output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        let next = match self.kind {
            Kind::EulerDiscrete => self.euler(output, sample, i)?,
            Kind::Ddim => self.ddim(output, sample, i)?,
            Kind::DpmSolverPlusPlus => self.dpm(output, sample, i)?,
            Kind::Pndm if i < self.prk_calls => self.prk(output, sample, i)?,
            Kind::Pndm => self.plms(output, sample, i)?,
            Kind::UniPc => self.unipc(output, sample, i)?,
            Kind::Lms => self.lms(output, sample, i)?,
        };
        self.step_index += 1;
        Ok(next)
    }

    fn euler(&self, output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let derivative = self.sigma_derivative(output, sample, i)?;
        Ok((sample + (derivative * (self.sigmas[i + 1] - self.sigmas[i]))?)?)
    }

    /// The Karras-style ODE's derivative at sigma i: (sample - x0) / sigma.
    fn sigma_derivative(&self, output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i];
        let x0 = match self.prediction {
            Prediction::Epsilon => (sample - (output * s)?)?,
            Prediction::V => ((output * (-s / (s * s + 1.0).sqrt()))? + (sample / (s * s + 1.0))?)?,
        };
        Ok(((sample - x0)? / s)?)
    }

    /// diffusers' `LMSDiscreteScheduler.step` (order 4, as pipelines call it): the last
    /// derivatives (in `outputs`) weighted by the integrals of their Lagrange polynomials over
    /// the step.
    fn lms(&mut self, output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        const ORDER: usize = 4;
        if self.outputs.len() == ORDER {
            self.outputs.remove(0);
        }
        self.outputs.push(self.sigma_derivative(output, sample, i)?);
        let order = (i + 1).min(ORDER);
        let mut next = sample.clone();
        for (j, d) in self.outputs.iter().rev().take(order).enumerate() {
            next = (next + (d * lms_coefficient(&self.sigmas, order, i, j))?)?;
        }
        Ok(next)
    }

    fn ddim(&self, output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let t = self.timesteps[i] as i64;
        let prev = t - (self.train_steps / self.steps) as i64;
        let a_t = self.alphas_cumprod[t as usize];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha
        };
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (mut x0, eps) = match self.prediction {
            Prediction::Epsilon => (((sample - (output * sb)?)? / sa)?, output.clone()),
            Prediction::V => (
                ((sample * sa)? - (output * sb)?)?,
                ((output * sa)? + (sample * sb)?)?,
            ),
        };
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        Ok(((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?)
    }

    /// diffusers' `PNDMScheduler.step_plms`: Adams-Bashforth over the last noise predictions,
    /// up to fourth order. Its first step is taken twice: once with the first prediction, then
    /// again from the same sample with the mean of the first two (the repeated timestep).
    fn plms(&mut self, output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let ratio = (self.train_steps / self.steps) as i64;
        let mut t = self.timesteps[i] as i64;
        let mut prev = t - ratio;
        if i == 1 {
            (prev, t) = (t, t + ratio);
        } else {
            if self.outputs.len() == 4 {
                self.outputs.remove(0);
            }
            self.outputs.push(output.clone());
        }
        let e = &self.outputs;
        let n = e.len();
        let mut sample = sample.clone();
        let combined = match (n, i) {
            (1, 0) => {
                self.restart = Some(sample.clone());
                output.clone()
            }
            (1, _) => {
                sample = self.restart.take().expect("set by the first step");
                ((output + &e[0])? / 2.0)?
            }
            (2, _) => (((&e[1] * 3.0)? - &e[0])? / 2.0)?,
            (3, _) => ((((&e[2] * 23.0)? - (&e[1] * 16.0)?)? + (&e[0] * 5.0)?)? / 12.0)?,
            _ => {
                let s = (((&e[3] * 55.0)? - (&e[2] * 59.0)?)? + (&e[1] * 37.0)?)?;
                ((s - (&e[0] * 9.0)?)? / 24.0)?
            }
        };
        self.pndm_prev(&sample, t, prev, &combined)
    }

    /// diffusers' `PNDMScheduler.step_prk`: per four UNet calls one Runge-Kutta step from the
    /// same sample, its intermediate samples at the half-way timestep. Each call moves the
    /// sample on with its own prediction; the fourth with the steps' weighted sum (1/6, 1/3,
    /// 1/3, 1/6), whose first prediction the linear multistep steps after it take up.
    fn prk(&mut self, output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let half = (self.train_steps / self.steps / 2) as i64;
        let now = self.timesteps[i] as i64;
        let prev = now - if i % 2 == 1 { 0 } else { half };
        let t = self.timesteps[i / 4 * 4] as i64;
        let sum = self.prk_sum.take();
        let combined = match (i % 4, sum) {
            (0, _) => {
                self.prk_sum = Some((output / 6.0)?);
                self.outputs.push(output.clone());
                self.restart = Some(sample.clone());
                output.clone()
            }
            (3, Some(sum)) => (sum + (output / 6.0)?)?,
            (_, Some(sum)) => {
                self.prk_sum = Some((sum + (output / 3.0)?)?);
                output.clone()
            }
            (_, None) => unreachable!("every fourth call starts the sum"),
        };
        let from = self.restart.clone().expect("set every fourth call");
        self.pndm_prev(&from, t, prev, &combined)
    }

    /// diffusers' `PNDMScheduler._get_prev_sample`: from `sample` at timestep `t` to `prev`
    /// with the (combined) prediction `output`.
    fn pndm_prev(&self, sample: &Tensor, t: i64, prev: i64, output: &Tensor) -> Result<Tensor> {
        let a_t = self.alphas_cumprod[t as usize];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.prediction {
            Prediction::Epsilon => output.clone(),
            Prediction::V => ((output * a_t.sqrt())? + (sample * b_t.sqrt())?)?,
        };
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        Ok(((sample * (a_prev / a_t).sqrt())? - (eps * ((a_prev - a_t) / denom))?)?)
    }

    /// The multistep solvers' x0 prediction at sigma i (alpha / sigma parametrisation).
    fn data_prediction(&self, output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (a_s, s_s) = alpha_sigma(self.sigmas[i]);
        Ok(match self.prediction {
            Prediction::Epsilon => ((sample - (output * s_s)?)? / a_s)?,
            Prediction::V => ((sample * a_s)? - (output * s_s)?)?,
        })
    }

    fn dpm(&mut self, output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (_, s_s) = alpha_sigma(self.sigmas[i]);
        let x0 = self.data_prediction(output, sample, i)?;
        let (a_t, s_t) = alpha_sigma(self.sigmas[i + 1]);
        let h = lambda(self.sigmas[i + 1]) - lambda(self.sigmas[i]);
        let n = self.timesteps.len();
        // The first step is first order, and so is the last as diffusers decides it (a final
        // sigma of zero, or few steps); everything else is the second-order midpoint update.
        let first_order = self.previous.is_none() || (i == n - 1 && self.dpm_final_first_order);
        let coef = a_t * ((-h).exp() - 1.0);
        let base = ((sample * (s_t / s_s))? - (&x0 * coef)?)?;
        let next = if first_order {
            base
        } else {
            let prev = self.previous.as_ref().expect("checked above");
            let h0 = lambda(self.sigmas[i]) - lambda(self.sigmas[i - 1]);
            let d1 = ((&x0 - prev)? * (h / h0))?;
            (base - (d1 * (0.5 * coef))?)?
        };
        self.previous = Some(x0);
        Ok(next)
    }
}

/// The integral from sigma t to sigma t + 1 of the Lagrange basis polynomial of sigma
/// t - `current` over sigmas t, t - 1, ..., t - order + 1 (diffusers integrates it with
/// scipy's quad): of degree below 4, so three-point Gauss-Legendre is exact.
fn lms_coefficient(sigmas: &[f64], order: usize, t: usize, current: usize) -> f64 {
    let basis = |tau: f64| {
        (0..order)
            .filter(|&k| k != current)
            .map(|k| (tau - sigmas[t - k]) / (sigmas[t - current] - sigmas[t - k]))
            .product::<f64>()
    };
    let (a, b) = (sigmas[t], sigmas[t + 1]);
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    let node = (3.0f64 / 5.0).sqrt();
    half * (5.0 / 9.0 * basis(mid - half * node)
        + 8.0 / 9.0 * basis(mid)
        + 5.0 / 9.0 * basis(mid + half * node))
}

/// UniPC's options that change its arithmetic.
#[derive(Clone, Debug)]
struct UniPcSettings {
    /// bh2: B(h) = e^h - 1; bh1: B(h) = h.
    bh2: bool,
    /// The predictor's order; each step's is lower at the start and, with
    /// `lower_order_final`, at the end.
    solver_order: usize,
    lower_order_final: bool,
    /// Steps after which the corrector does not run.
    disable_corrector: Vec<usize>,
}

impl UniPcSettings {
    fn of(cfg: &SchedulerConfig) -> Result<Self> {
        let solver_order = cfg.solver_order.unwrap_or(2);
        if !(1..=2).contains(&solver_order) {
            return Err(config_error(format!(
                "UniPC of order {solver_order} is not supported (1 or 2)"
            )));
        }
        if cfg.predict_x0 == Some(false) {
            return Err(config_error(
                "UniPC predicting noise (predict_x0 false) is not supported".into(),
            ));
        }
        let bh2 = match cfg.solver_type.as_deref() {
            None | Some("bh2") => true,
            Some("bh1") => false,
            Some(other) => {
                return Err(config_error(format!(
                    "UniPC solver_type {other:?} is not supported (bh1, bh2)"
                )))
            }
        };
        Ok(Self {
            bh2,
            solver_order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            disable_corrector: cfg.disable_corrector.clone().unwrap_or_default(),
        })
    }
}

impl Scheduler {
    /// diffusers' `UniPCMultistepScheduler.step`: the new x0 prediction first corrects the
    /// sample the last predictor step made (UniC), then a predictor step (UniP) of order 1 or
    /// 2 moves it on.
    fn unipc(&mut self, output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let set = self.unipc.clone().expect("set for UniPC");
        let x0 = self.data_prediction(output, sample, i)?;
        let mut sample = sample.clone();
        if let Some(last) = self.last_sample.take() {
            if !set.disable_corrector.contains(&(i - 1)) {
                sample = self.uni_c(&set, &x0, &last, i)?;
            }
        }
        if self.outputs.len() == set.solver_order {
            self.outputs.remove(0);
        }
        self.outputs.push(x0);
        let mut order = set.solver_order;
        if set.lower_order_final {
            order = order.min(self.timesteps.len() - i);
        }
        // Warm-up: one order more per step taken.
        self.order = order.min(self.outputs.len());
        self.last_sample = Some(sample.clone());
        self.uni_p(&set, &sample, i)
    }

    /// The predictor from `sample` at sigma i to sigma i + 1, with the x0 predictions in
    /// `outputs` (newest last).
    fn uni_p(&self, set: &UniPcSettings, x: &Tensor, i: usize) -> Result<Tensor> {
        let e = &self.outputs;
        let m0 = &e[e.len() - 1];
        let (a_t, s_t) = alpha_sigma(self.sigmas[i + 1]);
        let (_, s_s0) = alpha_sigma(self.sigmas[i]);
        let h = lambda(self.sigmas[i + 1]) - lambda(self.sigmas[i]);
        let (h_phi_1, b_h) = uni_coefficients(set, h);
        let base = ((x * (s_t / s_s0))? - (m0 * (a_t * h_phi_1))?)?;
        if self.order < 2 {
            return Ok(base);
        }
        // Order 2: half the first divided difference (diffusers' rhos_p for order 2).
        let rk = (lambda(self.sigmas[i - 1]) - lambda(self.sigmas[i])) / h;
        let d1 = ((&e[e.len() - 2] - m0)? / rk)?;
        Ok((base - (d1 * (a_t * b_h * 0.5))?)?)
    }

    /// The corrector of the sample at sigma i that the predictor made from `last` at sigma
    /// i - 1, with this step's x0 prediction `model_t`; `outputs` still ends with the previous
    /// step's.
    fn uni_c(
        &self,
        set: &UniPcSettings,
        model_t: &Tensor,
        last: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let e = &self.outputs;
        let m0 = &e[e.len() - 1];
        let (a_t, s_t) = alpha_sigma(self.sigmas[i]);
        let (_, s_s0) = alpha_sigma(self.sigmas[i - 1]);
        let h = lambda(self.sigmas[i]) - lambda(self.sigmas[i - 1]);
        let (h_phi_1, b_h) = uni_coefficients(set, h);
        let base = ((last * (s_t / s_s0))? - (m0 * (a_t * h_phi_1))?)?;
        let d1_t = (model_t - m0)?;
        let correction = if self.order < 2 {
            (d1_t * 0.5)?
        } else {
            // rhos_c solves [[1, 1], [rk, 1]] rho = [b1, b2].
            let hh = -h;
            let phi_1 = h_phi_1 / hh - 1.0;
            let b1 = phi_1 / b_h;
            let b2 = (phi_1 / hh - 0.5) * 2.0 / b_h;
            let rk = (lambda(self.sigmas[i - 2]) - lambda(self.sigmas[i - 1])) / h;
            let rho0 = (b1 - b2) / (1.0 - rk);
            let rho1 = b1 - rho0;
            let d1 = ((&e[e.len() - 2] - m0)? / rk)?;
            ((d1 * rho0)? + (d1_t * rho1)?)?
        };
        Ok((base - (correction * (a_t * b_h))?)?)
    }
}

/// `(alpha_t, sigma_t)` of a sigma as the multistep solvers use them.
fn alpha_sigma(s: f64) -> (f64, f64) {
    let a = 1.0 / (s * s + 1.0).sqrt();
    (a, s * a)
}

/// log(alpha_t / sigma_t): +inf at the final sigma of zero.
fn lambda(s: f64) -> f64 {
    let (a, sg) = alpha_sigma(s);
    a.ln() - sg.ln()
}

/// UniPC's e^-h - 1 and B(h) for a step of `h` in lambda, predicting x0.
fn uni_coefficients(set: &UniPcSettings, h: f64) -> (f64, f64) {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    (h_phi_1, if set.bh2 { h_phi_1 } else { hh })
}

fn linspace(a: f32, b: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![a];
    }
    (0..n)
        .map(|i| a + (b - a) * i as f32 / (n - 1) as f32)
        .collect()
}

/// numpy's `interp(t, arange(len), table)`.
fn interp(t: f64, table: &[f64]) -> f64 {
    let lo = (t.floor().max(0.0) as usize).min(table.len() - 1);
    let hi = (lo + 1).min(table.len() - 1);
    let w = t - lo as f64;
    table[lo] * (1.0 - w) + table[hi] * w
}

/// The timesteps diffusers' `set_timesteps` produces for each class and spacing.
/// UNet calls of PNDM's Runge-Kutta warm-up: three per step over its last four steps' halves.
const PRK_CALLS: usize = 12;

fn timesteps(
    kind: Kind,
    spacing: Spacing,
    n: usize,
    steps: usize,
    offset: usize,
    prk: bool,
) -> Vec<f64> {
    let (n_f, s_f) = (n as f64, steps as f64);
    // DPM-Solver++ and UniPC lay out steps + 1 points and drop the last (t = 0) one.
    let multistep = matches!(kind, Kind::DpmSolverPlusPlus | Kind::UniPc);
    let points = if multistep && spacing != Spacing::Trailing {
        steps + 1
    } else {
        steps
    };
    let mut ts: Vec<f64> = match spacing {
        Spacing::Linspace => {
            let p = points as f64;
            let raw = (0..points).map(|i| (n_f - 1.0) * i as f64 / (p - 1.0).max(1.0));
            let raw: Vec<f64> = if matches!(kind, Kind::EulerDiscrete | Kind::Lms) {
                raw.collect()
            } else {
                raw.map(f64::round_ties_even).collect()
            };
            raw.into_iter().rev().collect()
        }
        Spacing::Leading => {
            let ratio = (n / points) as f64;
            (0..points)
                .rev()
                .map(|i| (i as f64 * ratio).round_ties_even() + offset as f64)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = n_f / s_f;
            let mut v = Vec::with_capacity(steps);
            let mut t = n_f;
            while t > 0.0 && v.len() < steps {
                v.push(t.round_ties_even() - 1.0);
                t -= ratio;
            }
            v
        }
    };
    if points != steps {
        ts.truncate(steps);
    }
    if prk {
        // diffusers' PNDM warm-up over the four highest timesteps x0 < x1 < x2 < x3, each with
        // x + half a step, each twice but the ends: [x3, x2 + h, x2 + h, x2, x2, ..., x0 + h,
        // x0 + h, x0]; then linear multistep from x0 down.
        let half = (n / steps / 2) as f64;
        let pairs: Vec<f64> = ts[..4].iter().rev().flat_map(|&x| [x, x + half]).collect();
        let twice: Vec<f64> = pairs[..7].iter().flat_map(|&x| [x, x]).collect();
        let mut all: Vec<f64> = twice[1..13].iter().rev().copied().collect();
        debug_assert_eq!(all.len(), PRK_CALLS);
        all.extend(&ts[3..]);
        return all;
    }
    if kind == Kind::Pndm && ts.len() > 1 {
        // PLMS repeats the second-to-last training-order timestep: the UNet runs steps + 1 times.
        ts.insert(1, ts[1]);
    }
    ts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(spacing: &str) -> SchedulerConfig {
        serde_json::from_value(serde_json::json!({
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "timestep_spacing": spacing, "steps_offset": 1
        }))
        .unwrap()
    }

    #[test]
    fn unipc_bh1_ends_at_its_x0_prediction_where_diffusers_gives_nan() {
        // diffusers' last bh1 step to a sigma of zero multiplies -inf by 0; ours is finite.
        let mut c = cfg("trailing");
        c.solver_type = Some("bh1".into());
        let mut s = Scheduler::new(&c, Some(Kind::UniPc), 2).unwrap();
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap();
        let out = Tensor::new(&[0.3f32, 0.1, -0.2], &dev).unwrap();
        let x1 = s.step(&out, &x).unwrap();
        let want = s.data_prediction(&out, &x1, 1).unwrap();
        let last = s.step(&out, &x1).unwrap();
        let (got, want) = (
            last.to_vec1::<f32>().unwrap(),
            want.to_vec1::<f32>().unwrap(),
        );
        assert!(got.iter().all(|v| v.is_finite()), "{got:?}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} against {want:?}");
        }
    }

    #[test]
    fn a_scheduler_dnd_does_not_run_is_refused_with_the_choices() {
        let mut c = cfg("leading");
        c.class_name = Some("EulerAncestralDiscreteScheduler".into());
        let msg = Scheduler::new(&c, None, 4).unwrap_err().to_string();
        assert!(
            msg.contains("EulerAncestralDiscreteScheduler")
                && msg.contains("--scheduler euler|ddim|dpm-solver++|pndm|unipc|lms"),
            "{msg}"
        );
        // Every name the message offers is one `--scheduler` takes.
        for name in ["euler", "ddim", "dpm-solver++", "pndm", "unipc", "lms"] {
            assert!(Kind::parse(name).is_some(), "{name}");
        }
    }

    #[test]
    fn timesteps_by_hand() {
        let t = |k, s, n| {
            Scheduler::new(&cfg(s), Some(k), n)
                .unwrap()
                .timesteps()
                .to_vec()
        };
        assert_eq!(
            t(Kind::EulerDiscrete, "trailing", 4),
            vec![999., 749., 499., 249.]
        );
        assert_eq!(t(Kind::EulerDiscrete, "trailing", 1), vec![999.]);
        assert_eq!(t(Kind::Ddim, "leading", 4), vec![751., 501., 251., 1.]);
        assert_eq!(
            t(Kind::DpmSolverPlusPlus, "leading", 4),
            vec![801., 601., 401., 201.]
        );
        assert_eq!(
            t(Kind::DpmSolverPlusPlus, "linspace", 4),
            vec![999., 749., 500., 250.]
        );
    }
}
