"""Modern architectures by default (issue 13, part 1).

Tiny instances of each family (tests/_arch_models.py): scores are finite, ``ntk_sap_prune`` keeps
exactly ``N - floor((1 - d) * N)`` entries, the default prunable set holds the attention input
projections and the recurrent weight matrices, and the model is left as it was. The sampled weights
of the new kinds follow the fan-in documented in ``ntksap_fast.engine.arena``. Everything runs on a 2-core
CPU with batches of 2-4, 1-2 draws and 2 rounds.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from _arch_models import FAMILIES, SEQUENCE, TwoAttentions, lstm_bidirectional
from ntksap_fast import NtkSapScorer, apply_masks, ntk_sap_prune, ntk_sap_scores

DENSITY = 0.3
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def expected_keep(n_total: int, density: float) -> int:
    """DESIGN.md: n_keep = N - floor((1 - d) * N), computed independently of the package."""
    return n_total - math.floor((1.0 - density) * n_total)


def expected_default_names(model: nn.Module) -> list[str]:
    """The documented default set, found here from the modules' own registries (not the arena's
    predicate): Conv/Linear ``weight``; MHA ``in_proj_weight`` or ``q/k/v_proj_weight``; every
    weight in an RNN's ``_flat_weights_names`` (``weight_ih/hh/hr_l*[_reverse]``)."""
    wanted = set()
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            wanted.add(prefix + "weight")
        elif isinstance(mod, nn.MultiheadAttention):
            local = ATTENTION_WEIGHTS[:1] if mod._qkv_same_embed_dim else ATTENTION_WEIGHTS[1:]
            wanted.update(prefix + n for n in local)
        elif isinstance(mod, nn.RNNBase):
            wanted.update(prefix + n for n in mod._flat_weights_names if n.startswith("weight"))
    return [n for n, _ in model.named_parameters() if n in wanted]


def new_kind_names(model: nn.Module) -> list[str]:
    """Default prunable tensors owned by MultiheadAttention or an RNN (the kinds this issue adds)."""
    owners = {
        f"{m}.{p}" if m else p: mod for m, mod in model.named_modules() for p, _ in mod.named_parameters(recurse=False)
    }
    return [n for n in expected_default_names(model) if isinstance(owners[n], (nn.MultiheadAttention, nn.RNNBase))]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_scores_and_exact_prune(family: str) -> None:
    build, input_shape, output = FAMILIES[family]
    model = build()
    before = snapshot(model)
    x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.eval()
        y_before = output(model(x)) if output else model(x)
    model.train()
    names = expected_default_names(model)
    params = dict(model.named_parameters())

    scores = ntk_sap_scores(model, input_shape, draws=1, batch_size=2, seed=3, output=output)
    assert list(scores) == names
    for n, s in scores.items():
        assert s.shape == params[n].shape and s.dtype == torch.float32
        assert torch.isfinite(s).all(), n
    assert all(scores[n].sum() > 0 for n in new_kind_names(model)), "a new tensor gets no gradient"
    assert sum(float(s.sum()) for s in scores.values()) > 0

    masks = ntk_sap_prune(
        model, DENSITY, input_shape, iterations=2, draws=2, batch_size=2, seed=3, output=output, progress=False
    )
    assert list(masks) == names
    n_total = sum(params[n].numel() for n in names)
    assert sum(int(m.sum()) for m in masks.values()) == expected_keep(n_total, DENSITY)
    assert all(m.dtype == torch.bool and m.shape == params[n].shape for n, m in masks.items())

    # The model is as it was: values, mode, and what it computes.
    assert model.training
    after = snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    with torch.no_grad():
        model.eval()
        y_after = output(model(x)) if output else model(x)
    assert torch.equal(y_after, y_before)


def test_new_kinds_are_in_the_default_set() -> None:
    """The families that have them carry attention projections / recurrent weights in their masks."""
    vit_names = expected_default_names(FAMILIES["vit"][0]())
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in vit_names
    lstm_names = new_kind_names(lstm_bidirectional())
    assert lstm_names == [
        f"rnn.weight_{k}_l{layer}{d}" for layer in (0, 1) for d in ("", "_reverse") for k in ("ih", "hh")
    ]
    split = new_kind_names(TwoAttentions())
    assert split == ["packed.in_proj_weight", "split.q_proj_weight", "split.k_proj_weight", "split.v_proj_weight"]


def _record_sampled(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> list[dict[str, torch.Tensor]]:
    """Forward hooks recording, per call, the weights each module of ``kinds`` computed with.

    RNNs are read through ``_flat_weights`` after their forward (it rebuilds that list from its
    attributes when they changed, and hands the list to its kernel), attention modules through
    their attributes. Calls with all-zero weights (the scorer's input-shape check) are left out.
    """
    seen: list[dict[str, torch.Tensor]] = []
    for mname, mod in model.named_modules():
        if not isinstance(mod, kinds):
            continue

        def hook(module: nn.Module, args: tuple, out: object, prefix: str = mname) -> None:
            if isinstance(module, nn.RNNBase):
                pairs = [
                    (n, w) for n, w in zip(module._flat_weights_names, module._flat_weights) if n.startswith("weight")
                ]
            else:
                pairs = [(n, getattr(module, n)) for n in ATTENTION_WEIGHTS if getattr(module, n) is not None]
            got = {f"{prefix}.{n}" if prefix else n: w.detach().clone() for n, w in pairs}
            if any(w.abs().sum() > 0 for w in got.values()):
                seen.append(got)

        mod.register_forward_hook(hook)
    return seen


def _check_spread(sampled: dict[str, torch.Tensor], fan_in: dict[str, int], scorer: NtkSapScorer) -> None:
    """Root mean square of each sampled tensor vs the documented ``sqrt(2 / fan_in)``.

    The weights are N(0, std^2) draws (the clean branch of draw 0, mask all ones), so rms / std has
    a relative standard deviation of about 1 / sqrt(2 n) for n entries; allowed: 5 of those.
    Where a tensor's two dimensions differ, taking the other one as fan-in would be off by a
    factor of at least sqrt(1.5) here.
    """
    slots = {s.name: s for s in scorer.arena.slots}
    assert set(fan_in) <= set(slots)
    for name, f in fan_in.items():
        assert slots[name].fan_in == f, name
        w = sampled[name]
        rms = float(w.double().square().mean().sqrt())
        std = math.sqrt(2.0 / f)
        assert abs(rms / std - 1) < 5 / math.sqrt(2 * w.numel()), (name, rms, std)


def test_sampled_spread_of_attention_projections() -> None:
    torch.manual_seed(0)
    model = TwoAttentions()
    seen = _record_sampled(model, (nn.MultiheadAttention,))
    scorer = NtkSapScorer(model, (6, 64), draws=1, batch_size=2, seed=5)
    scorer.scores()
    sampled = {**seen[0], **seen[1]}  # draw 0, clean branch: the packed module, then the split one
    _check_spread(
        sampled,
        {"packed.in_proj_weight": 64, "split.q_proj_weight": 32, "split.k_proj_weight": 16, "split.v_proj_weight": 48},
        scorer,
    )


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")
def test_sampled_spread_of_recurrent_weights() -> None:
    """Bidirectional 2-layer LSTM with a projection: input 24, hidden 32, proj 16, so the second
    layer's input is 2 * 16; called bare, its tuple output picked with ``output=``."""
    torch.manual_seed(0)
    model = nn.LSTM(24, 32, num_layers=2, bidirectional=True, proj_size=16, batch_first=True)
    seen = _record_sampled(model, (nn.RNNBase,))
    scorer = NtkSapScorer(model, (4, 24), draws=1, batch_size=2, seed=5, output=lambda out: out[0])
    scorer.scores()
    fan_in = {}
    for d in ("", "_reverse"):
        fan_in |= {
            f"weight_ih_l0{d}": 24,
            f"weight_hh_l0{d}": 16,
            f"weight_hr_l0{d}": 32,
            f"weight_ih_l1{d}": 32,
            f"weight_hh_l1{d}": 16,
            f"weight_hr_l1{d}": 32,
        }
    assert [s.name for s in scorer.arena.slots] == [n for n, _ in model.named_parameters() if n.startswith("weight")]
    _check_spread(seen[0], fan_in, scorer)  # draw 0, clean branch


def test_apply_masks_on_attention_and_recurrent_weights() -> None:
    """The masks of the new kinds apply in the torch.nn.utils.prune convention: the masked model
    computes what a copy with the masked-out entries zeroed computes."""
    for build, input_shape, output in (FAMILIES["lstm_bidirectional"], FAMILIES["dict_encoder"]):
        model = build()
        masks = ntk_sap_prune(
            model, DENSITY, input_shape, iterations=2, draws=1, batch_size=2, output=output, progress=False
        )
        zeroed = copy.deepcopy(model).eval()
        with torch.no_grad():
            for n, p in zeroed.named_parameters():
                if n in masks:
                    p.mul_(masks[n])
        apply_masks(model, masks).eval()
        x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            got, want = model(x), zeroed(x)
        got, want = (output(got), output(want)) if output else (got, want)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_recurrent_modules_let_go_of_sampled_weights() -> None:
    build, input_shape, _ = FAMILIES["gru"]
    model = build()
    ntk_sap_scores(model, input_shape, draws=1, batch_size=2)
    rnn = model.rnn
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names))


def test_recurrent_model_with_batched_draws() -> None:
    build, input_shape, _ = FAMILIES["lstm_bidirectional"]
    model = build()
    one = ntk_sap_scores(model, input_shape, draws=2, batch_size=2, draw_batch=1)
    two = ntk_sap_scores(model, input_shape, draws=2, batch_size=2, draw_batch=2)
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-6 * float(one[n].abs().max()))
    # vmap has no batching rule for aten::lstm: the scorer runs such models' draws in sequence
    assert NtkSapScorer(model, input_shape, draws=2, batch_size=2, draw_batch=2).config.draw_batch == 1


def test_recurrent_layers_run_in_training_mode_without_dropout_and_are_restored() -> None:
    """cuDNN's RNN backward refuses eval mode: recurrent layers run training=True, dropout=0 (same
    arithmetic as eval), and get their mode and dropout back afterwards."""
    build, input_shape, _ = FAMILIES["lstm_bidirectional"]
    model = build()
    model.rnn.dropout = 0.25
    model.eval()
    seen = []
    model.rnn.register_forward_pre_hook(lambda m, a: seen.append((m.training, m.dropout)))
    ntk_sap_scores(model, input_shape, draws=1, batch_size=2)
    assert seen and all(s == (True, 0.0) for s in seen)
    assert model.rnn.dropout == 0.25 and not model.rnn.training and not model.training


@pytest.mark.cuda  # cuDNN's RNN kernels need a CUDA device
@pytest.mark.parametrize("family", ["lstm_bidirectional", "gru"])
def test_recurrent_families_on_cuda(family: str) -> None:
    build, input_shape, _ = FAMILIES[family]
    model = build().cuda()
    masks = ntk_sap_prune(model, DENSITY, input_shape, iterations=2, draws=2, batch_size=2, progress=False)
    n_total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == expected_keep(n_total, DENSITY)


TIMM_MODELS = {  # name: (create_model keyword arguments, input shape), small enough for a 2-core CPU
    "resnet10t": ({}, (3, 32, 32)),  # a CNN
    "vit_tiny_patch16_224": (
        {"img_size": 32, "patch_size": 8, "depth": 2, "num_heads": 2, "embed_dim": 16},
        (3, 32, 32),
    ),  # a ViT
    "mobilevit_xxs": ({}, (3, 32, 32)),  # a hybrid: convolutions and transformer blocks
}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
@pytest.mark.slow
def test_timm_models(name: str) -> None:
    import timm  # the test extra installs it

    kwargs, input_shape = TIMM_MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    before = snapshot(model)
    names = expected_default_names(model)
    masks = ntk_sap_prune(model, DENSITY, input_shape, iterations=2, draws=1, batch_size=2, progress=False)
    assert list(masks) == names
    if name != "resnet10t":
        assert any(n.endswith("qkv.weight") for n in names)
    n_total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == expected_keep(n_total, DENSITY)
    assert all(torch.equal(t, before[n]) for n, t in snapshot(model).items())


@pytest.mark.slow
def test_transformers_vit_with_output() -> None:
    import transformers  # the test extra installs it

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=10,
    )
    model = transformers.ViTForImageClassification(config)
    scores = ntk_sap_scores(model, (3, 32, 32), draws=1, batch_size=2, output=lambda out: out.logits)
    assert all(torch.isfinite(s).all() for s in scores.values())
    masks = ntk_sap_prune(
        model, DENSITY, (3, 32, 32), iterations=2, draws=1, batch_size=2, output=lambda out: out.logits, progress=False
    )
    assert list(masks) == expected_default_names(model)
    n_total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == expected_keep(n_total, DENSITY)


class EmbeddingsToLogits(nn.Module):
    """A language model fed float token embeddings ``(batch, tokens, width)`` instead of token ids."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds=embeddings).logits


def test_transformers_gpt2_through_its_input_embeddings() -> None:
    """GPT-2's Conv1D layers (weight (in, out)) are prunable by default and sampled with fan-in = in."""
    import transformers  # the test extra installs it
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2)
    model = EmbeddingsToLogits(transformers.GPT2LMHeadModel(config))
    conv1d = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    sampled: list[dict[str, torch.Tensor]] = []
    for mname, mod in model.named_modules():
        if isinstance(mod, Conv1D):
            mod.register_forward_hook(
                lambda module, args, out, name=f"{mname}.weight": sampled.append({name: module.weight.detach().clone()})
            )
    scorer = NtkSapScorer(model, (6, 16), draws=1, batch_size=2, seed=3)
    sampled.clear()  # the input-shape check ran the model with zero weights
    scorer.scores()
    first = {}
    for record in sampled:  # draw 0's clean branch comes first
        for name, w in record.items():
            first.setdefault(name, w)
    assert [s.name for s in scorer.arena.slots] == conv1d  # the tied lm_head/wte embedding is not pruned
    _check_spread(first, {n: dict(model.named_parameters())[n].shape[0] for n in conv1d}, scorer)
    masks = scorer.prune(DENSITY, 2)
    n_total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == expected_keep(n_total, DENSITY)


def test_dict_output_without_selector_is_a_type_error() -> None:
    build, input_shape, _ = FAMILIES["dict_encoder"]
    with pytest.raises(TypeError, match="output="):
        NtkSapScorer(build(), input_shape, draws=1, batch_size=2)


def test_sequence_shape() -> None:
    """The recurrent families read (time, features) inputs; a wrong feature count is named."""
    build, _, _ = FAMILIES["gru"]
    with pytest.raises(ValueError, match="input_shape"):
        NtkSapScorer(build(), (SEQUENCE[0], SEQUENCE[1] + 1), draws=1, batch_size=2)
