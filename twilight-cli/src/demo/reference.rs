//! The CPU reference step of a variant over a host cache: the derived data the variant reads
//! (Quest bounds, Double Sparsity labels, 4-bit K), built from the cache, then select, prune
//! and attend. The CPU path, the GPU path's checks and the baselines all run it.

use twilight::reference::{
    decode_step, DsLabels, HostKv, Quant4Cache, QuestMeta, StepInputs, StepParams, StepResult,
};
use twilight::{HostPageTable, Pruning, Result, Selector, VariantSpec};

use super::Inputs;

/// What a variant reads beside K and V.
pub(super) struct Derived {
    quest: Option<QuestMeta>,
    ds: Option<DsLabels>,
    quant: Option<Quant4Cache>,
}

impl Derived {
    /// The data `spec` reads, built from the cache; Double Sparsity's labels take the demo's
    /// channels.
    ///
    /// # Errors
    /// Channels that do not fit the cache.
    pub fn build(
        spec: &VariantSpec,
        x: &Inputs,
        kv: &HostKv,
        table: &HostPageTable,
    ) -> Result<Derived> {
        let quest = (spec.selector == Selector::Quest)
            .then(|| QuestMeta::build(kv, table))
            .transpose()?;
        let ds = match (spec.selector, &x.ds_channels) {
            (Selector::DoubleSparse { .. }, Some(channels)) => {
                Some(DsLabels::build(kv, table, channels.clone())?)
            }
            _ => None,
        };
        let quant = (spec.pruning == Pruning::TopP)
            .then(|| Quant4Cache::build(kv, table))
            .transpose()?;
        Ok(Derived { quest, ds, quant })
    }

    /// What was built, for the report.
    pub fn names(&self) -> Vec<String> {
        [
            self.quest.as_ref().map(|_| "Quest page bounds".to_string()),
            self.ds
                .as_ref()
                .map(|l| format!("double-sparse labels ({} channels per token)", l.r)),
            self.quant.as_ref().map(|_| "4-bit K".to_string()),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The step of `spec` with the demo's B0, p and scale.
    ///
    /// # Errors
    /// Inputs the reference refuses (a derived structure `spec` needs and was not built with).
    pub fn step(
        &self,
        spec: &VariantSpec,
        x: &Inputs,
        kv: HostKv,
        table: &HostPageTable,
    ) -> Result<StepResult> {
        Ok(decode_step(
            spec,
            &StepParams::new(x.budget, x.p, x.sm_scale),
            &StepInputs {
                q: &x.step.q,
                num_qo_heads: x.num_qo_heads(),
                kv,
                table,
                quest: self.quest.as_ref(),
                quant: self.quant.as_ref(),
                ds: self.ds.as_ref(),
            },
        )?)
    }
}
