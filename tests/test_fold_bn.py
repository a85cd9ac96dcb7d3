"""fold-bn: the folded graph computes what the original did, and BN nodes are gone."""

import numpy as np
import onnx
from builders import conv_model, run
from onnxtq.passes import FoldBatchNormPass

from onnxtq.graph import Graph
from onnxtq.pass_infra import Context


def _fold(model):
    ctx = Context(Graph(model))
    report = FoldBatchNormPass().run(ctx)
    ctx.graph.remove_dead()
    return ctx.graph.proto(), report


def test_conv_bn_folds_exactly(rng):
    for group, c_out in ((1, 6), (2, 6), (4, 4)):
        model = conv_model(c_in=4, c_out=c_out, group=group, pads=[1, 1, 1, 1])
        x = rng.standard_normal((2, 4, 10, 10)).astype(np.float32)
        folded, report = _fold(model)
        assert [r.status for r in report.records] == ["folded"]
        assert all(n.op_type != "BatchNormalization" for n in folded.graph.node)
        onnx.checker.check_model(folded, full_check=True)
        np.testing.assert_allclose(run(folded, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_conv_without_bias_gets_one(rng):
    model = conv_model()
    conv = model.graph.node[0]
    del conv.input[2]
    x = rng.standard_normal((1, 4, 10, 10)).astype(np.float32)
    folded, _ = _fold(model)
    assert len(folded.graph.node[0].input) == 3
    np.testing.assert_allclose(run(folded, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_bn_after_relu_is_left_with_a_reason():
    model = conv_model()
    conv, bn, relu = (onnx.NodeProto.FromString(n.SerializeToString()) for n in model.graph.node[:3])
    relu.input[0], relu.output[0] = "conv", "r"
    bn.input[0], bn.output[0] = "r", "relu"  # conv -> relu -> bn -> (rest reads "relu")
    del model.graph.node[:3]
    for node in reversed((conv, relu, bn)):
        model.graph.node.insert(0, node)
    onnx.checker.check_model(model, full_check=True)
    folded, report = _fold(model)
    assert report.records[0].status == "skipped" and "Relu" in report.records[0].reason
    assert any(n.op_type == "BatchNormalization" for n in folded.graph.node)
