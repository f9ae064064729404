"""Importance objects shared by s2ft and prune: planted units rank first, one object serves both passes, user
subclasses plug in, non-finite scores are refused naming the batch, and the shared selection's tie rules."""

from __future__ import annotations

import copy
import json
import math

import models
import pytest
import torch

import sparsify_fx
from sparsify_fx import ConfigError, PruneConfig, S2FTConfig
from sparsify_fx.passes.importance import (
    IMPORTANCES,
    ActivationImportance,
    Calibration,
    Combine,
    Feed,
    FixedImportance,
    GradientImportance,
    Importance,
    MagnitudeImportance,
    RandomImportance,
    Units,
    UnitSlice,
    resolve,
    select,
)
from sparsify_fx.passes.s2ft import state_of

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
CALIB = [(torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(s)),) for s in range(2)]
MLP = "model.layers.0.mlp"


def _loss(model, batch):
    return model(*batch).logits.float().pow(2).mean()


def _llama(planted: int | None = None, scale: float = 10.0, rows_only: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.llama(layers=1).eval()
    if planted is not None:
        mlp = model.model.layers[0].mlp
        with torch.no_grad():
            mlp.up_proj.weight[planted] *= scale
            if not rows_only:
                mlp.gate_proj.weight[planted] *= scale
                mlp.down_proj.weight[:, planted] *= scale
    return model


def _ffn_units(combine: Combine = Combine.SUM, weigh: bool = True) -> list[Units]:
    """Layer 0's 128 FFN channels, described by hand: up/gate rows and down columns, observed at down's input."""
    index = torch.arange(128).view(128, 1)
    rows = [UnitSlice(f"{MLP}.{p}_proj.weight", 0, index, "out") for p in ("gate", "up")]
    down = UnitSlice(f"{MLP}.down_proj.weight", 1, index, "in")
    dtype = torch.float32 if combine is Combine.SUM else torch.float64
    return [Units("ffn0", 128, [*rows, down], [Feed(f"{MLP}.down_proj", -1, down, weigh)], combine, dtype)]


# ------------------------------------------------------------------------------------------ planted units
@pytest.mark.parametrize("combine", list(Combine))
def test_magnitude_ranks_the_scaled_channel_first(combine):
    model = _llama(planted=37)
    scores = MagnitudeImportance()(model, _ffn_units(combine))["ffn0"]
    assert scores.shape == (128,) and scores.dtype == (torch.float32 if combine is Combine.SUM else torch.float64)
    assert int(scores.argmax()) == 37
    # p=1 ranks the same planted unit first; p is validated
    assert int(MagnitudeImportance(p=1)(model, _ffn_units(combine))["ffn0"].argmax()) == 37
    with pytest.raises(ConfigError, match=r"p must be a finite number > 0, got 0"):
        MagnitudeImportance(p=0)


def test_product_combine_scores_a_unit_dead_in_one_module_lowest():
    model = _llama(planted=37)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 37] = 0.0  # large rows, but nothing reads the channel
    scores = MagnitudeImportance()(model, _ffn_units(Combine.PRODUCT))["ffn0"]
    assert int(scores.argmin()) == 37
    assert int(MagnitudeImportance()(model, _ffn_units(Combine.SUM))["ffn0"].argmax()) == 37  # a sum does not see it


@pytest.mark.parametrize("weigh", [True, False])
def test_activation_ranks_the_loud_channel_first(weigh):
    model = _llama(planted=11, rows_only=True)  # up row x10: channel 11 enters down_proj 10x louder
    scores = ActivationImportance()(model, _ffn_units(weigh=weigh), Calibration(CALIB))["ffn0"]
    assert int(scores.argmax()) == 11


@pytest.mark.parametrize("kind", ["fisher", "taylor"])
def test_gradient_ranks_the_unit_with_large_gradients_first(kind):
    # channel 9's rows and column x10: its activation, the gradients of its slices and grad*weight all grow
    model = _llama(planted=9)
    before = {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()}
    imp = GradientImportance(kind)
    scores = imp(model, _ffn_units(), Calibration(CALIB, loss_fn=_loss))["ffn0"]
    assert int(scores.argmax()) == 9
    assert {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()} == before  # flags and grads restored


def test_random_is_seeded_per_group_in_order():
    units = [Units("a", 5, []), Units("b", 3, [], dtype=torch.float64)]
    s = RandomImportance(4)(None, units)
    g = torch.Generator().manual_seed(4)
    assert torch.equal(s["a"], torch.rand(5, generator=g)) and torch.equal(s["b"], torch.rand(3, generator=g,
                                                                                               dtype=torch.float64))
    assert not torch.equal(RandomImportance(5)(None, units)["a"], s["a"])


def test_gradient_scores_ignore_dropout():
    # GPT-2 in train mode with dropout 0.1: gradients are taken in eval mode, so the picks do not depend on the RNG
    picks = []
    for seed in (1, 2):
        torch.manual_seed(0)
        model = models.gpt2().train()
        torch.manual_seed(seed)
        cfg = S2FTConfig(attention_ratio=0.5, ffn_ratio=0.25, strategy="gradient", calibration=CALIB, loss_fn=_loss,
                         progress=False)
        sparsify_fx.s2ft(model, (IDS,), cfg)
        assert model.training
        picks.append([u.selected for u in state_of(model).units])
    assert picks[0] == picks[1]


# ------------------------------------------------------------------------------------ one object, both passes
@pytest.mark.parametrize("imp", [MagnitudeImportance(), ActivationImportance(), GradientImportance("taylor")],
                         ids=["magnitude", "activation", "taylor"])
def test_one_object_ranks_for_s2ft_and_prune(imp):
    # s2ft trains the strongest channel; prune, with the same object, removes channels that do nothing
    model = _llama(planted=37)
    cfg = S2FTConfig(strategy=imp, attention=(), ffn_ratio=1 / 128, calibration=CALIB, loss_fn=_loss,
                     progress=False)
    sparsify_fx.s2ft(model, (IDS,), cfg)
    assert [u.selected for u in state_of(model).units] == [[37]]

    model = _llama()
    dead = [3, 50, 90, 127]
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, dead] = 0.0
        mlp.up_proj.weight[dead] = 0.0  # zero activation too, so every score sees them as dead
    kept = [i for i in range(128) if i not in dead]
    up_kept = mlp.up_proj.weight[kept].clone()
    ratio = {"ffn_channels": 4 / 128}
    sparsify_fx.prune(model, (IDS,), PruneConfig(ratio=ratio, score=imp, calibration=CALIB, loss_fn=_loss,
                                                 progress=False))
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, up_kept)


class LastFirst(Importance):
    """A user's importance: higher unit index, more important (and it records what it was shown)."""

    def __init__(self) -> None:
        self.seen: list[Units] = []

    def score(self, model, units, calib):
        self.seen += units
        return {u.name: torch.arange(u.num_units, dtype=torch.float64) for u in units}


def test_user_importance_plugs_into_both_passes():
    imp = LastFirst()
    model = _llama()
    sparsify_fx.s2ft(model, (IDS,), S2FTConfig(strategy=imp, attention=(), ffn_ratio=2 / 128, progress=False))
    assert [u.selected for u in state_of(model).units] == [[126, 127]]
    # recorded in the adapter's JSON config by name
    assert json.loads(json.dumps(state_of(model).config.to_dict()))["strategy"] == "LastFirst()"
    model = _llama()
    up = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    sparsify_fx.prune(model, (IDS,), PruneConfig(ratio={"ffn_channels": 0.25}, score=imp, progress=False))
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, up[32:])  # the 32 lowest indices went
    assert imp.seen and all(u.weights and u.num_units for u in imp.seen)


# ------------------------------------------------------------------------------------------ non-finite scores
class NaNAt(Importance):
    def score(self, model, units, calib):
        return {u.name: torch.where(torch.arange(u.num_units) == 1, math.nan, 1.0) for u in units}


@pytest.mark.parametrize("run", ["s2ft", "prune"])
def test_non_finite_user_scores_are_refused_and_the_model_is_unchanged(run):
    model = _llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"NaNAt\(\) gives non-finite scores for group .*use (strategy|score)="):
        if run == "s2ft":
            sparsify_fx.s2ft(model, (IDS,), S2FTConfig(strategy=NaNAt(), progress=False))
        else:
            sparsify_fx.prune(model, (IDS,), PruneConfig(score=NaNAt(), progress=False))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


def test_wrong_shape_is_refused():
    class Short(Importance):
        def score(self, model, units, calib):
            return {u.name: torch.zeros(2) for u in units}

    with pytest.raises(ConfigError, match=r"must return a tensor of 128 scores for group 'ffn0', got \(2,\)"):
        Short()(_llama(), _ffn_units())


def test_non_finite_batches_are_named():
    model = _llama()

    def scaled(m, b):
        return _loss(m, b[:1]) * b[1]

    calib = Calibration([(IDS, 1.0), (IDS, math.inf)], loss_fn=scaled, option="score='taylor'", where="prune")
    with pytest.raises(ConfigError, match=r"prune: score='taylor': calibration batch 1 gives a non-finite loss"):
        GradientImportance("taylor")(model, _ffn_units(), calib)
    embeds = torch.full((2, 8, 64), math.nan)
    calib = Calibration([(IDS,), {"inputs_embeds": embeds}], option="strategy='activation'", field="strategy")
    with pytest.raises(ConfigError, match=r"strategy='activation': calibration batch 1 gives non-finite activations "
                                          r"\(NaN/inf\) at the input of model\.layers\.0\.mlp\.down_proj.*"
                                          r"strategy='magnitude'"):
        ActivationImportance()(model, _ffn_units(), calib)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[4, 0] = math.inf
    with pytest.raises(ConfigError, match=r"the weights of model\.layers\.0\.mlp\.up_proj\.weight \(group 'ffn0'\) "
                                          r"hold NaN/inf"):
        MagnitudeImportance()(model, _ffn_units())


# ------------------------------------------------------------------------------------------ names and selection
def test_strings_map_through_one_table_and_configs_refuse_other_objects():
    assert isinstance(resolve("taylor"), GradientImportance) and resolve("taylor").name == "taylor"
    assert resolve("random", 7).seed == 7
    assert set(IMPORTANCES) == {"random", "magnitude", "activation", "gradient", "taylor"}
    imp = MagnitudeImportance()
    assert resolve(imp) is imp
    with pytest.raises(ConfigError, match=r"kind must be 'fisher' or 'taylor', got 'hessian'"):
        GradientImportance("hessian")
    with pytest.raises(ConfigError, match=r"strategy must be random, magnitude, gradient or activation, got <object"):
        S2FTConfig(strategy=object()).validate()
    with pytest.raises(ConfigError, match=r"score=GradientImportance\('taylor'\) needs a loss"):
        PruneConfig(score=GradientImportance("taylor")).validate()
    with pytest.raises(ConfigError, match=r"strategy=ActivationImportance\(\) needs calibration batches"):
        S2FTConfig(strategy=ActivationImportance()).validate()


def test_select_per_group_and_across_groups():
    a, b = torch.tensor([0.5, 0.1, 0.5, 0.9]), torch.tensor([0.5, 0.2])
    # per group, stable: ties go to the lower index whichever end is picked
    assert select([a, b], [2, 1], highest=True) == [[0, 3], [0]]
    assert select([a, b], [2, 1], highest=False) == [[0, 1], [1]]
    # across groups: ascending by (score, group, unit); the highest-first ranking is its exact reverse
    assert select([a, b], 3, highest=False) == [[0, 1], [1]]
    assert select([a, b], 3, highest=True) == [[2, 3], [0]]
    # admit skips candidates (here: group 0 takes at most one) and the count still fills from the rest
    taken = [0]

    def one_from_a(i: int) -> bool:
        if i == 0 and taken[0] >= 1:
            return False
        taken[0] += i == 0
        return True

    assert select([a, b], 3, highest=True, admit=one_from_a) == [[3], [0, 1]]
    assert select([a, b], None, highest=False, admit=lambda i: i == 1) == [[], [0, 1]]


def test_each_importance_is_named_as_configs_spell_it():
    class Plain(Importance):
        def score(self, model, units, calib):
            return {}

    class Named(Plain):
        fixed_name = "named"

    got = [RandomImportance(3).name, ActivationImportance().name, FixedImportance({}).name,
           MagnitudeImportance().name, MagnitudeImportance(p=1).name, GradientImportance("taylor").name,
           Plain().name, Named().name]
    assert got == ["random", "activation", "fixed", "magnitude", "magnitude(p=1)", "taylor", "Plain", "named"]
