"""Our load-balancing loss against transformers' `load_balancing_loss_func`: the conversion factor docs/train.md gives.

Ours, per MoE layer, averaged over layers: E * sum_i f_i P_i with f_i = (top-k assignments to i) / (T k)
(sums to 1). transformers: E * sum_i f'_i P_i with f'_i = (assignments to i) / T (sums to k), over the
router logits of all layers pooled. So for one MoE layer transformers' loss is k times ours, and
`balance_coef = k * router_aux_loss_coef` trains the same objective.
"""

from __future__ import annotations

import pytest
import torch

from mergekit_lite.train.loop import causal_lm_loss
from mergekit_lite.train.moe import RouterTap

E, K = 8, 2


def mixtral(layers: int):
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=K,
                        router_aux_loss_coef=0.02)
    return AutoModelForCausalLM.from_config(cfg).float()


def test_one_layer_transformers_loss_is_k_times_ours():
    model = mixtral(1)
    tap = RouterTap(model)
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
    balance, _ = tap.losses()
    assert out.aux_loss.item() == pytest.approx(K * balance.item(), rel=1e-6)
    # the whole training objective: transformers' loss with router_aux_loss_coef equals ours with k times it
    ours = causal_lm_loss(out.logits, ids) + K * model.config.router_aux_loss_coef * balance
    assert out.loss.item() == pytest.approx(ours.item(), rel=1e-6)
    assert K * balance.item() > 1.0  # random routers: away from perfect balance (ours 1, transformers' k)


def test_several_layers_transformers_pools_the_layers():
    """With several MoE layers transformers takes f and P over all layers' tokens at once; ours averages the
    per-layer losses. The factor k holds for the pooled figure, not for our per-layer mean."""
    model = mixtral(3)
    tap = RouterTap(model)
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    seen = list(tap._seen)
    per_layer_mean, _ = tap.losses()
    tap._seen = [tuple(torch.cat(parts) for parts in zip(*seen))]  # every layer's tokens as one layer
    pooled, _ = tap.losses()
    assert out.aux_loss.item() == pytest.approx(K * pooled.item(), rel=1e-6)
    assert abs(out.aux_loss.item() - K * per_layer_mean.item()) > 1e-4  # so the factor is exact for one layer
