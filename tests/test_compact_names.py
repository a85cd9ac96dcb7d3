"""compact-names: the renamed graph computes bit-for-bit what it did, keeps its interface and
provenance, gets smaller, and renames subgraph bodies consistently with the outer graph."""

import numpy as np
import onnx
from builders import bundled, make_model, run
from onnx import TensorProto, helper
from onnxtq.passes import CompactNamesPass
from onnxtq.passes.compact_names import short_names

from onnxtq import compress
from onnxtq.graph import Graph, copy_model, provenance
from onnxtq.pass_infra import Context


def test_short_names_are_unique_short_first_and_avoid_taken():
    gen = short_names({"b", "a0"})
    names = [next(gen) for _ in range(5000)]
    assert len(set(names)) == len(names)
    assert names[0] == "a" and "b" not in names and "a0" not in names
    assert [len(n) for n in names] == sorted(len(n) for n in names)
    assert all(n[0].isalpha() and n.isalnum() for n in names)


def test_compressed_bundled_model_is_identical_after_renaming(tmp_path):
    path, calib = bundled("mnist_transformer")
    plain, short = tmp_path / "plain.onnx", tmp_path / "short.onnx"
    compress(path, plain, "fold-bn,calibrate,rtn{bits=4,block=32}", calib=calib)
    report = compress(path, short, "fold-bn,calibrate,rtn{bits=4,block=32},compact-names", calib=calib)
    a, b = onnx.load(str(plain)), onnx.load(str(short))
    onnx.checker.check_model(b, full_check=True)
    assert [v.name for v in b.graph.input] == [v.name for v in a.graph.input] == ["image"]
    assert [v.name for v in b.graph.output] == [v.name for v in a.graph.output]
    assert max(len(t.name) for t in b.graph.initializer) <= 2
    assert short.stat().st_size < plain.stat().st_size
    assert [provenance(n) for n in b.graph.node] == [provenance(n) for n in a.graph.node]
    assert "renamed" in report.passes[-1].notes[0]
    image = np.load(path.parent / "eval.npz")["image"][:32]
    np.testing.assert_array_equal(run(b, {"image": image})[0], run(a, {"image": image})[0])


def test_subgraph_bodies_follow_the_outer_renaming(rng):
    """If-branches read an outer initializer and an outer intermediate by name."""
    w = rng.standard_normal((4, 4)).astype(np.float32)
    outer = [
        helper.make_node("MatMul", ["x", "long_weight_name"], ["long_intermediate"], name="matmul_node"),
        helper.make_node("ReduceSum", ["long_intermediate"], ["total"], keepdims=0, name="sum_node"),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="cmp_node"),
    ]

    def branch(op, name):
        node = helper.make_node(op, ["long_intermediate"], [f"{name}_out"], name=f"{name}_node")
        info = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2, 4])
        return helper.make_graph([node], name, [], [info])

    outer.append(
        helper.make_node(
            "If", ["positive"], ["y"], then_branch=branch("Relu", "then"), else_branch=branch("Neg", "else")
        )
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    model = make_model(outer, [x], [y], {"long_weight_name": w, "zero": np.zeros((), np.float32)})
    ctx = Context(Graph(copy_model(model)))  # a Graph owns the proto it is made from
    CompactNamesPass().run(ctx)
    renamed = ctx.graph.proto()
    onnx.checker.check_model(renamed, full_check=True)
    names = [n.name for n in renamed.graph.node] + [t.name for t in renamed.graph.initializer]
    assert all(len(n) <= 2 for n in names)
    for sign in (1.0, -1.0):
        feed = {"x": sign * np.abs(rng.standard_normal((2, 4))).astype(np.float32) @ np.linalg.inv(w)}
        np.testing.assert_array_equal(run(renamed, feed)[0], run(model, feed)[0])
