"""ops/moe.py: mergekit-moe's random routers and the expert modifiers.

Oracles: torch.manual_seed(seed) followed by one torch.randn / torch.rand call of the whole
(layers, gates, hidden) shape, which is what mergekit-moe 0.1.5 runs (reference/moe.md §3.1-3.2);
the normal distribution's moments for the noise; the whole-tensor draw for any row piece.
"""

from __future__ import annotations

import math

import pytest
import torch

from recipekit.ops.moe import expert_noise, perturb_expert, random_router


class TestRandomRouter:
    """Oracle: torch's global generator seeded as mergekit's --random-seed seeds it."""

    @pytest.mark.parametrize("layer,rows", [(0, (0, 3)), (2, (1, 3)), (3, (3, 4))])
    def test_random_is_the_slice_of_one_global_draw(self, layer, rows):
        torch.manual_seed(42)
        whole = torch.randn((4, 4, 64))
        got = random_router("random", seed=42, layers=4, gates=4, hidden=64, layer=layer,
                            rows=rows)
        assert torch.equal(got, whole[layer, rows[0]:rows[1]])

    def test_uniform_random_is_mergekits_formula(self):
        torch.manual_seed(7)
        scale = math.sqrt(1.0 / 64)
        whole = torch.rand((3, 2, 64)) * 2 * scale - scale
        for layer in range(3):
            got = random_router("uniform_random", seed=7, layers=3, gates=2, hidden=64,
                                layer=layer, rows=(0, 2))
            assert torch.equal(got, whole[layer])
        assert whole.abs().max().item() <= scale

    def test_statistics(self):
        g = random_router("random", seed=0, layers=2, gates=8, hidden=4096, layer=1, rows=(0, 8))
        norms = g.norm(dim=1)
        assert ((norms / math.sqrt(4096) - 1).abs() < 0.05).all()
        assert abs(g.mean().item()) < 0.02 and abs(g.std().item() - 1) < 0.02

    def test_unknown_mode(self):
        with pytest.raises(ValueError, match="not a random gate mode"):
            random_router("hidden", seed=0, layers=1, gates=1, hidden=4, layer=0, rows=(0, 1))


class TestExpertModifiers:
    """Oracle: N(0, 1) moments; any row piece equals the whole draw's rows."""

    def test_noise_is_standard_normal_and_piece_independent(self):
        whole = expert_noise((11, -5), 0, 256, 512)
        assert abs(whole.mean().item()) < 0.01 and abs(whole.std().item() - 1) < 0.01
        assert abs(((whole.abs() < 1).double().mean() - 0.6827).item()) < 0.01
        assert torch.equal(expert_noise((11, -5), 100, 164, 512), whole[100:164])
        assert not torch.equal(expert_noise((12, -5), 0, 256, 512), whole)

    def test_perturb_rounds_once_and_scales_after_noise(self):
        w = torch.randn(64, 32, dtype=torch.bfloat16)
        got = perturb_expert(w, lo=0, noise_scale=0.1, residual_scale=0.5, key=(1, 2),
                             dtype=torch.bfloat16)
        want = ((w.float() + expert_noise((1, 2), 0, 64, 32) * 0.1) * 0.5).to(torch.bfloat16)
        assert torch.equal(got, want)
        piece = perturb_expert(w[16:48], lo=16, noise_scale=0.1, residual_scale=0.5,
                               key=(1, 2), dtype=torch.bfloat16)
        assert torch.equal(piece, got[16:48])
