"""The forked decoding pool must survive what the parent process holds: here, uncollected ONNX Runtime
sessions, whose destructors crashed or hung a forked child that collected them (an ingest under
encoder.runtime auto builds its session before it forks the pool)."""
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("onnxruntime")

SCRIPT = textwrap.dedent("""
    import gc, os, sys
    gc.disable()  # keep the garbage below uncollected until the fork, as a busy process may
    import numpy as np, onnxruntime as ort
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2

    class Holder:
        pass
    for _ in range(3):
        holder = Holder()
        holder.me = holder  # a reference cycle: only the collector frees it
        holder.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        holder.session.run(None, {"x": np.ones((64, 4), np.float32)})
        del holder

    def collect_in_child():
        gc.collect()
        return os.getpid()

    if sys.argv[1] == "plain":  # the pool as it was: forked with the garbage collectable in the child
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    else:
        from mammo_retrieval.core.config import load_config
        from mammo_retrieval.pipeline.executors import local_executor
        pool = local_executor(1, load_config(env={}).ingest)
    print("child", pool.submit(collect_in_child).result(timeout=60) != os.getpid())
    pool.shutdown()
""")


def run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=180)


def test_a_forked_worker_never_collects_the_parents_onnx_sessions():
    done = run("local_executor")
    assert done.returncode == 0 and "child True" in done.stdout, done.stderr[-2000:]


def test_the_check_above_can_fail():
    """Without the frozen collector the same child dies (or hangs, as it did in the suite)."""
    try:
        done = run("plain")
    except subprocess.TimeoutExpired:
        return
    assert done.returncode != 0 and "BrokenProcessPool" in done.stderr
