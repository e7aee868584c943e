//! Everything a describe run stands on: the models, the summariser, the probing set and the
//! store. `dnd describe` and the terminal UI both load through here, in two steps so that a
//! caller can show each: finding every file (downloads included), then loading the weights.

use std::sync::Arc;

use candle_core::Device;
use tokio::runtime::Handle;

use crate::config::{Decoder, Settings};
use crate::device;
use crate::error::Result;
use crate::hub::{self, HubOptions, ModelStatus, ResolvedModel, Role};
use crate::pipeline::Models;
use crate::probe::ProbeSet;
use crate::store::Store;
use crate::summarise::{ApiLlm, ApiOptions, Llm, LocalLlm, LocalOptions};

/// What a describe run needs, loaded.
pub struct Workspace {
    pub models: Models,
    pub llm: Arc<dyn Llm>,
    pub probe: ProbeSet,
    pub store: Arc<Store>,
}

/// The summariser chosen: an endpoint (checked at once) or a local model (loaded with the
/// others).
enum Summariser {
    Api(Arc<dyn Llm>),
    Local(ResolvedModel),
}

/// Every file found and the cheap parts opened; the weights are not loaded yet.
pub struct Resolved {
    summariser: Summariser,
    models: [ResolvedModel; 4],
    /// The tiny decoder, when it decodes.
    tiny_vae: Option<ResolvedModel>,
    probe: ProbeSet,
    store: Arc<Store>,
}

/// The state of every model a run with these settings needs, without downloading anything.
pub async fn status(s: &Settings, local_llm: bool, opts: &HubOptions) -> Vec<ModelStatus> {
    let mut out = Vec::new();
    for role in s.roles(local_llm) {
        out.push(hub::status(role, s.model(role), opts).await);
    }
    out
}

impl Workspace {
    /// Checks the LLM endpoint settings (before anything heavy), opens the probing set and
    /// the store, and finds every model's files, downloading what is missing unless offline.
    pub fn resolve(
        rt: &Handle,
        s: &Settings,
        local_llm: bool,
        opts: &HubOptions,
    ) -> Result<Resolved> {
        let summariser = if local_llm {
            Summariser::Local(rt.block_on(hub::resolve(Role::Llm, &s.llm_local, opts))?)
        } else {
            Summariser::Api(Arc::new(ApiLlm::new(ApiOptions::from_settings(s)?)?))
        };
        let probe = ProbeSet::open(&s.probe)?;
        let store = Arc::new(Store::open(&s.db)?);
        let mut models = Vec::with_capacity(4);
        for role in Role::PIPELINE {
            models.push(rt.block_on(hub::resolve(role, s.model(role), opts))?);
        }
        let tiny_vae = match s.decoder {
            Decoder::Tiny | Decoder::Hybrid => {
                Some(rt.block_on(hub::resolve(Role::TinyVae, &s.tiny_vae, opts))?)
            }
            Decoder::Vae => None,
        };
        Ok(Resolved {
            summariser,
            models: models.try_into().expect("four roles"),
            tiny_vae,
            probe,
            store,
        })
    }
}

impl Resolved {
    /// Loads every model's weights on `device` (opened once by the caller, from the
    /// settings' `device`), in the settings' dtype.
    pub fn load(self, s: &Settings, device: &Device) -> Result<Workspace> {
        let dtype = device::dtype_for(s.dtype, device)?;
        let llm: Arc<dyn Llm> = match self.summariser {
            Summariser::Api(api) => api,
            Summariser::Local(m) => Arc::new(LocalLlm::load(
                &m,
                device,
                dtype,
                LocalOptions {
                    max_new_tokens: s.llm_max_tokens,
                },
            )?),
        };
        let models = Models::load(
            &self.models,
            self.tiny_vae.as_ref(),
            s.decoder,
            llm.model(),
            device,
            dtype,
        )?;
        Ok(Workspace {
            models,
            llm,
            probe: self.probe,
            store: self.store,
        })
    }
}
