"""``headprobe run`` on every family: the configuration validated against every registered model type, and the
whole job end to end on a tiny random model of each family (encoders included), whose report names the checks the
model cannot have."""
import json

import pytest
from transformers import AutoConfig

from headprobe import InputError
from headprobe.extract.hooks import ARCHITECTURES
from headprobe.probes.attribution import AttributionConfig
from headprobe.train.pipeline import RunConfig, SAESettings, run
from headprobe.train.run_model import resolve_run, run_model
from helpers import RUN_FAMILIES, save_model_folder

ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert"}


def test_the_run_names_no_model_specific_number():
    """Every model-dependent setting of the default run is left to the model."""
    sae = RunConfig().sae
    assert sae.layer is None and sae.d_sae is None


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_the_run_configuration_is_validated_against_every_family(model_type):
    """Each registered model type's default config: the SAE on its middle layer with 8x its width, causal-LM checks
    only for decoders, and a layer it does not have refused in one line."""
    config = AutoConfig.for_model(model_type)
    model = run_model(config, name=model_type)
    layout = model.layout
    cfg = resolve_run(RunConfig(), model)
    assert cfg.sae.layer == layout.n_layers // 2 and 0 <= cfg.sae.layer < layout.n_layers
    assert cfg.sae.d_sae == cfg.sae.expansion * layout.n_heads * layout.d_head
    assert model.capabilities.causal_lm == (model_type not in ENCODERS)
    with pytest.raises(InputError, match=rf"^--sae.layer {layout.n_layers}: {model_type} has layers "
                                         rf"0..{layout.n_layers - 1}"):
        resolve_run(RunConfig(sae=SAESettings(layer=layout.n_layers)), model)


def test_an_unregistered_family_is_refused_in_one_line():
    with pytest.raises(InputError, match=r"^--model t5: architecture 't5' is not supported"):
        run_model(AutoConfig.for_model("t5"), name="t5")


def small_run(model: str, out) -> RunConfig:
    """One task, a small SAE, every check of the default run at a small size; model-dependent settings left out."""
    return RunConfig(model=model, out=str(out), tasks=["capitals"], max_examples=24, logger="none", progress=False,
                     attribution=AttributionConfig(head_scores=True, ablate=2, draws=2, examples=12,
                                                   scores=["retrieval", "negative", "copying", "successor",
                                                           "induction"], pool_scores=["retrieval"]),
                     sae=SAESettings(k=4, batch_size=256, tokens=4096, corpus_examples=12, ce_tokens=128))


@pytest.mark.parametrize("family", RUN_FAMILIES)
def test_the_main_job_runs_end_to_end_on_every_family(family, tmp_path):
    model = save_model_folder(tmp_path / family, family)
    result = run(small_run(model, tmp_path / "run"))
    report = result.report.with_name("report.md").read_text()
    assert result.report.name == "index.html" and result.report.exists()
    assert (tmp_path / "run" / "report" / "img" / "stage_map.png").exists() and "## Stage map" in report
    assert "## Sparse autoencoder (layer 1," in report  # the middle layer of a 2- or 3-layer model
    ablation = json.loads((tmp_path / "run" / "attribution" / "ablation.json").read_text())
    sae_eval = json.loads((tmp_path / "run" / ".steps" / "sae_eval.json").read_text())["result"]
    if family in ENCODERS:
        assert "## Checks this model cannot have" in report
        for check in ("SAE CE loss recovered", "retrieval score", "negative score", "copying score"):
            assert f"| {check} | {family} is an encoder without next-token logits" in report, check
        assert ablation["capitals"]["metric"] == "readout_logprob" and "ce_clean" not in sae_eval
    else:
        assert ablation["capitals"]["metric"] == "margin" and "ce_recovered_mean" in sae_eval
    assert "fve" in sae_eval
