"""Per-layer work on threads (--jobs) and on a Dask cluster (--cluster): the same file wherever it ran."""

import threading

import numpy as np
import pytest
import threadpoolctl
from builders import bundled, matmul_site

from onnxtq import parallel
from onnxtq.cli import main
from onnxtq.codec import Layer
from onnxtq.codecs.tq import TqCodec
from onnxtq.quantize import SEARCH_ELEMENTS, _clip_search, int_range, quantize_groups

#: crq codes the big weights, rtn 2-bit zero points the rest: both passes' per-layer tasks
PIPELINE = "calibrate,crq{bits=4,min_elements=8192},rtn{bits=2,min_elements=0}"


@pytest.fixture(autouse=True)
def local_after():
    yield
    parallel.configure()


def _compress(tmp_path, name, *extra):
    model, calib = bundled("mnist_transformer")
    out = tmp_path / f"{name}.onnx"
    argv = ["-q", "compress", str(model), "-o", str(out), "--calib", str(calib), "--pipeline", PIPELINE, *extra]
    assert main(argv) == 0
    return out.read_bytes()


def test_any_cut_of_the_rows_and_any_number_of_threads_give_the_same_codes():
    rng = np.random.default_rng(0)
    rows = 3 * SEARCH_ELEMENTS // 100 + 7  # cut in several parts
    w = rng.standard_normal((100, rows)).astype(np.float32).T  # laid out as a MatMul weight's groups are
    h = rng.random((100, rows)).astype(np.float32).T
    for bits, symmetric in ((4, True), (2, False)):
        whole = np.ascontiguousarray(w), np.ascontiguousarray(h)
        whole_scale, whole_zp = _clip_search(*whole, int_range(bits, symmetric), symmetric)  # all rows at once
        whole_code = quantize_groups(whole[0], bits, symmetric, True, whole[1])
        for jobs in (1, 2, 3):
            parallel.configure(jobs)
            code = quantize_groups(w, bits, symmetric, True, h)
            np.testing.assert_array_equal(code.scale, whole_scale.astype(np.float32))
            np.testing.assert_array_equal(code.q, whole_code.q)  # each part's codes written in place
            if not symmetric:
                np.testing.assert_array_equal(code.zero_point, whole_zp)


def test_the_next_task_runs_while_the_caller_finishes_this_ones_answer():
    parallel.configure(2)
    started = [threading.Event() for _ in range(4)]

    def task(k):
        started[k].set()
        if k == 2:
            raise ValueError("task 2 fails")
        return k * k

    answers = parallel.task_map(task, range(4))
    assert next(answers) == 0
    assert started[1].wait(60)  # begun before the caller asks for it
    assert next(answers) == 1
    with pytest.raises(ValueError, match="task 2 fails"):
        next(answers)
    early = parallel.task_map(task, range(4))
    assert next(early) == 0
    early.close()  # a caller that stops: the call running ahead finishes, nothing hangs


def test_jobs_one_and_all_cores_write_the_same_file(tmp_path):
    assert _compress(tmp_path, "one", "--jobs", "1") == _compress(tmp_path, "all")


def test_layers_on_threads_come_back_in_order_each_with_one_blas_thread():
    def blas_threads(item):
        return item, max(pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas")

    before = blas_threads(None)[1]
    for jobs in (1, 2, 3):
        parallel.configure(jobs)
        answers = list(parallel.layer_map(blas_threads, range(7)))
        assert [item for item, _ in answers] == list(range(7))
        assert {threads for _, threads in answers} == ({before} if jobs == 1 else {1})
        assert blas_threads(None)[1] == before  # and the limit goes with them


def test_layers_run_beside_one_another_within_the_largest_working_set_and_a_margin(monkeypatch):
    """Items run together only while their working sets add up to at most the largest one's and BESIDE_BYTES
    (here 5 + 2): a worker skips an item that does not fit for a later one that does; answers come in order."""
    monkeypatch.setattr(parallel, "BESIDE_BYTES", 2)
    sizes = [5, 4, 1, 3, 3, 4, 4, 1]
    lock, held, most = threading.Lock(), {"now": 0}, {"now": 0}
    started = {k: threading.Event() for k in range(len(sizes))}

    def work(item):
        with lock:
            held["now"] += sizes[item]
            most["now"] = max(most["now"], held["now"])
        started[item].set()
        beside = None
        if item in (0, 3):  # the light item 2 runs beside the largest, and the two of 3 beside each other
            beside = started[2 if item == 0 else 4].wait(timeout=30)
        with lock:
            held["now"] -= sizes[item]
        return item, beside

    parallel.configure(2)
    answers = list(parallel.layer_map(work, range(len(sizes)), working_set=lambda item: sizes[item]))
    assert [item for item, _ in answers] == list(range(len(sizes)))
    assert most["now"] <= 7  # never 5 + 4 or 4 + 4
    assert answers[0][1] is True  # the second worker skipped item 1 (4 beside 5) for item 2
    assert answers[3][1] is True  # 3 + 3 fit


def test_the_largest_item_waiting_starts_first():
    """A large layer left for last would run alone while the other workers wait: workers take the largest item
    that fits, the first of equals; answers still come in order."""
    sizes, started = [1, 2, 9, 3, 2], []

    def work(item):
        started.append(item)  # two workers: items picked one after the other may start in either order
        return item

    parallel.configure(2)
    assert list(parallel.layer_map(work, range(len(sizes)), working_set=lambda item: sizes[item])) == [0, 1, 2, 3, 4]
    assert 2 in started[:2] and 0 in started[-2:]  # in the given order, 2 would start third and 0 first


def test_answers_waiting_for_the_caller_count_against_the_budget(monkeypatch):
    """With answer_bytes, an answer holds its bytes until the caller takes it (auto's emit: each answer a whole
    coded layer, smaller than the working set that made it): the workers run ahead of a slow caller while the
    budget allows, two at a time even after the largest item (first to start, last to be taken) is answered,
    and what is held passes the budget by at most the caller's next item."""
    monkeypatch.setattr(parallel, "BESIDE_BYTES", 2)  # a budget of 9 + 2: beside the largest, nothing runs
    sizes, answer = [4] * 11 + [9], 1
    lock, running, done, taken = threading.Lock(), set(), set(), set()
    held, ahead, beside = [], [], []

    def work(item):
        with lock:
            running.add(item)
            held.append(sum(sizes[k] for k in running) + answer * len(done - taken))
            ahead.append(item - len(taken))
            if 11 in done:
                beside.append(len(running))
        threading.Event().wait(0.005)
        with lock:
            running.discard(item)
            done.add(item)
        return item

    parallel.configure(2)
    for item in parallel.layer_map(work, range(12), sizes.__getitem__, lambda item: answer):
        with lock:
            taken.add(item)
        threading.Event().wait(0.01)  # a slow caller: without the budget the workers would run to the end
    assert sorted(taken) == list(range(12)) and sorted(done) == list(range(12))
    assert max(held) <= 11 + 4 + answer and max(ahead) >= 3 and max(beside) == 2
    doubled = parallel.layer_map(lambda item: item * 2, range(5), lambda item: 1, lambda item: 1)
    assert list(doubled) == [0, 2, 4, 6, 8]


def test_a_failing_layer_fails_the_map_and_a_map_left_early_stops():
    def work(item):
        if item == 3:
            raise ValueError("layer 3")
        return item

    parallel.configure(2)
    with pytest.raises(ValueError, match="layer 3"):
        list(parallel.layer_map(work, range(6), working_set=lambda item: item))
    answers = parallel.layer_map(lambda item: item, range(50), working_set=lambda item: item)
    assert [next(answers), next(answers)] == [0, 1]
    answers.close()  # its workers finish what they hold and stop


def test_tq_curves_working_set_is_the_one_measured():
    """An MLP down-projection of a 353M model (4,096 inputs) held 1.24 GB making its curves, its up-projection
    (1,024 inputs) 0.46 GB."""

    def layer(d, n):
        return Layer(matmul_site(d, n), None, None)

    assert TqCodec.working_set(layer(4096, 1024)) == pytest.approx(1.24e9, rel=0.05)
    assert TqCodec.working_set(layer(1024, 4096)) == pytest.approx(0.46e9, rel=0.05)


def test_one_heap_asks_glibc_for_one_arena_unless_the_user_chose(monkeypatch):
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(parallel.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    parallel.one_heap()
    assert calls == [(-8, 1)]  # M_ARENA_MAX in glibc's malloc.h
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    parallel.one_heap()
    assert calls == [(-8, 1)]
    monkeypatch.setattr(parallel.ctypes, "CDLL", lambda name: object())  # no mallopt: musl, macOS
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    parallel.one_heap()


@pytest.mark.parametrize("pipeline", ["calibrate,tq{rate=3}", "calibrate,ecsq{rate=3}", "calibrate,auto{bits=4}"])
def test_curves_made_on_threads_write_the_file_made_one_layer_after_the_other(tmp_path, pipeline):
    one, two = _files_by_jobs(tmp_path, pipeline)
    assert one == two


def _files_by_jobs(tmp_path, pipeline: str) -> list[bytes]:
    """The mnist_transformer files the pipeline writes with one worker and with two."""
    model, calib = bundled("mnist_transformer")
    files = []
    for jobs in ("1", "2"):
        out = tmp_path / f"{jobs}.onnx"
        argv = ["-q", "compress", str(model), "-o", str(out), "--calib", str(calib), "--pipeline", pipeline]
        assert main([*argv, "--jobs", jobs]) == 0
        files.append(out.read_bytes())
    return files


@pytest.mark.parametrize("pipeline", ["calibrate,tq{rate=3}", "calibrate,auto{bits=4}"])
def test_curves_kept_within_the_largest_working_set_write_the_same_file(tmp_path, monkeypatch, pipeline):
    """With no margin beside the largest working set (the MLP's down-projections here, 1.6 MB; the attention's qkv
    projections 1.4 MB, the rest 0.3–1.0 MB), the schedule changes and the file does not."""
    monkeypatch.setattr(parallel, "BESIDE_BYTES", 0)
    one, two = _files_by_jobs(tmp_path, pipeline)
    assert one == two


def test_a_dask_cluster_of_two_workers_writes_the_local_file(tmp_path):
    distributed = pytest.importorskip("distributed")
    local = _compress(tmp_path, "local")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        with distributed.get_task_stream(client) as stream:
            remote = _compress(tmp_path, "remote", "--cluster", cluster.scheduler_address)
        ran = {name: [t for t in stream.data if t["key"].startswith(name)] for name in ("crq_task", "quantize_task")}
        assert remote == local
        assert all(ran.values())  # both passes sent their layers
        assert {t["worker"] for t in ran["crq_task"] + ran["quantize_task"]} == set(client.scheduler_info()["workers"])


def test_an_unreachable_cluster_is_a_usage_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setattr(parallel, "CONNECT_SECONDS", 2)
    model, calib = bundled("mnist_transformer")
    argv = ["-q", "compress", str(model), "-o", str(tmp_path / "o.onnx"), "--calib", str(calib)]
    assert main([*argv, "--cluster", "tcp://127.0.0.1:9"]) == 2
    assert "cannot reach the Dask scheduler" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()
