"""tools/charts.py: `plan --chart` and `diff --chart`, tested for what they draw.

Oracles: the recipe's own numbers (a gradient evaluated at t = i/(N−1), a rule's constant),
‖a − b‖ / ‖a‖ computed here with torch from the two checkpoints' tensors, and matplotlib's
objects of the returned figure (its lines' data, axis labels, legend); never pixels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.builders import read_tensors
from tests.helpers.recipes import write_recipe

pytest.importorskip("matplotlib")


def slerp_recipe(tmp_path: Path, a: Path, b: Path) -> Path:
    return write_recipe(tmp_path, f"""
        recipekit: 1
        models: {{a: {a}, b: {b}}}
        steps:
          - name: sl
            op: merge
            method: slerp
            from: [a, b]
            parameters:
              t: [{{match: "*.mlp.*", value: 0.3}}, {{value: {{gradient: [0, 0.5, 1]}}}}]
        output: {{path: ./out}}
        """)


def lines_of(fig) -> dict[str, list[float]]:
    (ax,) = fig.axes
    return {line.get_label(): [float(y) for y in line.get_ydata()] for line in ax.get_lines()}


class TestParameterChart:
    def test_series_and_figure(self, tmp_path, tiny_llama, tiny_llama_b):
        """8 layers, t = gradient [0, 0.5, 1] except `*.mlp.*` (0.3): two series."""
        from recipekit.inputs.resolve import resolve_sources
        from recipekit.plan import compile_plan
        from recipekit.recipe import load_recipe
        from recipekit.tools.charts import draw_parameter_chart, parameter_series

        recipe = load_recipe(slerp_recipe(tmp_path, tiny_llama, tiny_llama_b))
        series = parameter_series(compile_plan(recipe, resolve_sources(recipe)))
        gradient = [i / 7 for i in range(8)]
        mlp = [k for k in series if "mlp." in k]
        rest = [k for k in series if k not in mlp]
        assert len(mlp) == len(rest) == 1 and rest[0].startswith("slerp t (")
        assert series[mlp[0]] == [0.3] * 8
        assert series[rest[0]] == pytest.approx(gradient)
        fig = draw_parameter_chart(series, tmp_path / "p.png")
        assert lines_of(fig) == {k: pytest.approx(v) for k, v in series.items()}
        (ax,) = fig.axes
        assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "value"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(series)
        assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_cli(self, cli, tmp_path, tiny_llama, tiny_llama_b):
        r = slerp_recipe(tmp_path, tiny_llama, tiny_llama_b)
        result = cli("plan", r, "-v", "--chart", tmp_path / "t.svg")
        assert result.exit_code == 0, result.output
        assert result.stderr == f"wrote {tmp_path / 't.svg'}\n"
        assert (tmp_path / "t.svg").read_text().lstrip().startswith("<?xml")


class TestDiffChart:
    def test_series_match_torch(self, tmp_path, tiny_llama, tiny_llama_b):
        from recipekit.inputs.checkpoints import open_checkpoint
        from recipekit.tools.charts import diff_series, draw_diff_chart
        from recipekit.tools.diff import diff_checkpoints

        report = diff_checkpoints(open_checkpoint(str(tiny_llama)),
                                  open_checkpoint(str(tiny_llama_b)))
        series = diff_series(report)
        ta, tb = read_tensors(tiny_llama), read_tensors(tiny_llama_b)

        def rel(name: str) -> float:
            a, b = ta[name].double(), tb[name].double()
            return float((a - b).norm() / a.norm())

        assert "mlp.up_proj" in series and "self_attn.q_proj" in series
        assert series["self_attn.q_proj"] == pytest.approx(
            [rel(f"model.layers.{i}.self_attn.q_proj.weight") for i in range(8)], rel=1e-9)
        whole = []
        for i in range(8):
            names = [n for n in ta if n.startswith(f"model.layers.{i}.")]
            a = torch.cat([ta[n].double().flatten() for n in names])
            b = torch.cat([tb[n].double().flatten() for n in names])
            whole.append(float((a - b).norm() / a.norm()))
        assert series["whole layer"] == pytest.approx(whole, rel=1e-9)
        fig = draw_diff_chart(series, tmp_path / "d.pdf")
        assert lines_of(fig) == {k: pytest.approx(v) for k, v in series.items()}
        assert fig.axes[0].get_ylabel() == "relative change"
        assert (tmp_path / "d.pdf").read_bytes()[:5] == b"%PDF-"

    def test_whole_layer_drawn_beside_many_modules(self, tmp_path):
        """A layer of 12 module tensors (Qwen2 with q/k/v biases, GPT-2) made 13 series, and
        the chart kept the first 12: the "whole layer" line, appended last, was the one left
        out (found by a black-box check)."""
        from recipekit.tools.charts import MAX_LINES, diff_series, draw_diff_chart

        modules = [f"m{k}" for k in range(MAX_LINES)]
        rows = [{"name": f"model.layers.{i}.{m}.weight", "rel_norm": 0.1 * k}
                for i in range(3) for k, m in enumerate(modules)]
        layers = {f"model.layers.{i}": {"rel_norm": 0.5 + i} for i in range(3)}
        series = diff_series({"tensor_list": rows, "layers": layers})
        assert len(series) == MAX_LINES + 1
        drawn = lines_of(draw_diff_chart(series, tmp_path / "d.svg"))
        assert drawn["whole layer"] == [0.5, 1.5, 2.5]

    def test_cli(self, cli, tmp_path, tiny_llama, tiny_llama_b):
        result = cli("diff", tiny_llama, tiny_llama_b, "-q", "--chart", tmp_path / "d.png")
        assert result.exit_code == 1, result.output  # they differ, like diff(1)
        assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


class TestRefusals:
    def test_without_matplotlib(self, cli, tmp_path, tiny_llama, monkeypatch):
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
        result = cli("diff", tiny_llama, tiny_llama, "-q", "--chart", tmp_path / "d.png")
        assert result.exit_code == 2
        assert result.stderr == ("--chart needs matplotlib, which is not installed; "
                                 "pip install 'recipekit[charts]'\n")
        assert not (tmp_path / "d.png").exists()

    def test_unknown_suffix(self, cli, tmp_path, tiny_llama):
        result = cli("diff", tiny_llama, tiny_llama, "-q", "--chart", tmp_path / "d.txt")
        assert result.exit_code == 2
        assert result.stderr == (f"--chart {tmp_path / 'd.txt'}: unknown image type '.txt'; "
                                 "name a .png, .svg or .pdf file\n")
