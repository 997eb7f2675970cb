"""A site alone as a model: `lone.as_exported` is the site exactly as the model has it, so that
`--pass auto` times the original with everything the exporter put in it (torch SDPA's NaN guard,
the mask add, the scale on Q and K), which every rewrite removes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from attnrewrite.onnx.canonicalize import canonicalize
from attnrewrite.onnx.detect import detect
from attnrewrite.validate import lone
from tests.conftest import ort_run


def _sites(exp):
    model = ir.load(exp.path)
    canonicalize(model)
    return model, detect(model).sites


@pytest.mark.parametrize("name, exporter", [("minilm", "torchscript17"), ("hf_vit_sdpa", "torchscript17"),
                                            ("hf_vit", "dynamo18"), ("hf_vit", "dynamo23")])
def test_a_site_alone_as_exported_computes_what_it_computes_in_the_model(exported, name, exporter):
    exp = exported(name, exporter)
    model, sites = _sites(exp)
    feeds, _ = exp.reference()
    names = [s.output.name for s in sites] + [v.name for s in sites for v in lone.exported_inputs(s)]
    values = outputs = ort_run(ir.to_proto(model), feeds, list(dict.fromkeys(names)))
    for site in sites:
        assert lone.exports_alone(site)
        inputs = lone.exported_inputs(site)
        feed = {lone.exported_name(v): values[v.name] for v in inputs}
        alone = lone.as_exported(model, site, {k: v.shape for k, v in feed.items()})
        assert sorted(n.op_type for n in alone.graph.node) == sorted(n.op_type for n in site.nodes)
        np.testing.assert_allclose(ort_run(alone, feed)["out"], outputs[site.output.name], rtol=1e-5, atol=1e-6)


def test_the_sdpa_export_keeps_its_nan_guard_alone(exported):
    """torch's SDPA export (MiniLM with attn_implementation="sdpa") wraps the probabilities in
    Where(IsNaN(p), 0, p): two more passes over the largest tensor, which the lone original keeps."""
    exp = exported("minilm", "torchscript17")
    model, sites = _sites(exp)
    shapes = {lone.exported_name(v): tuple(d if isinstance(d, int) else 1 for d in v.shape)
              for v in lone.exported_inputs(sites[0])}
    ops = [n.op_type for n in lone.as_exported(model, sites[0], shapes).graph.node]
    assert "IsNaN" in ops and ops.count("Softmax") == 1


def test_a_site_whose_nodes_do_not_compute_its_output_is_not_cut_out():
    """Such a site is timed as a plain softmax attention instead (`lone.original`)."""
    from types import SimpleNamespace

    assert not lone.exports_alone(SimpleNamespace(nodes=(), output=object()))
