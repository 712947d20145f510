"""Concurrency and interruption on one Generator.

Contract (RELIABILITY.md): any number of Python threads may call generate / stream / logits on
one Generator at once. Each call has its own recurrent state; the model's forward passes are
serialised by a lock inside the Generator (the GIL is released while computing), so each
thread's output equals its single-threaded run. One stream iterator must not be advanced from
two threads (Python refuses: "generator already executing"). KeyboardInterrupt during
generate/stream stops within one decode step and leaves the Generator usable.
"""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import mambart

from model_dirs import make_model_dir

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def model_dir(request, tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp(request.param) / "m", request.param,
                          "bfloat16", seed=7)


def _jobs():
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(8):
        n = int(rng.integers(1, 40)) if i != 3 else 700  # one prompt longer than a chunk
        prompt = [int(t) for t in rng.integers(0, 100, size=n)]
        kw = dict(max_new_tokens=int(rng.integers(20, 80)), temperature=[0.0, 0.8, 1.2][i % 3],
                  top_k=[0, 5, 0][i % 3], top_p=[1.0, 0.9, 0.95][i % 3], seed=100 + i,
                  ignore_eos=True)
        jobs.append((prompt, kw))
    return jobs


def _run(g, job):
    kind, (prompt, kw) = job
    if kind == "generate":
        return g.generate(prompt, **kw).token_ids
    if kind == "stream":
        return list(g.stream(prompt, **kw))
    if kind == "batch":
        rs = g.generate([prompt, prompt[: max(1, len(prompt) // 2)]], **kw)
        return [r.token_ids for r in rs]
    return g.logits(prompt)


def test_threads_match_single_threaded(model_dir):
    g = mambart.Generator(model_dir)
    kinds = ["generate", "stream", "batch", "logits"]
    work = [(kinds[i % 4], job) for i, job in enumerate(_jobs())]
    expected = [_run(g, w) for w in work]

    results = {}
    errors = []
    barrier = threading.Barrier(len(work))

    def worker(i, w):
        try:
            barrier.wait()
            for rep in range(3):
                results[(i, rep)] = _run(g, w)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=worker, args=(i, w)) for i, w in enumerate(work)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    for (i, rep), got in results.items():
        if work[i][0] == "logits":
            np.testing.assert_array_equal(got, expected[i])
        else:
            assert got == expected[i], (work[i][0], i, rep)
    assert len(results) == 3 * len(work)


def test_threads_interleave_streams(model_dir):
    """Streams advanced in lock-step from different threads interleave their decode steps on
    the shared model, and still give their single-threaded tokens."""
    g = mambart.Generator(model_dir)
    prompts = [[1, 2, 3], [50, 60], [7] * 300, [99]]
    want = [g.generate(p, max_new_tokens=50, temperature=1.0, seed=9, ignore_eos=True).token_ids
            for p in prompts]
    got = [None] * len(prompts)
    step = threading.Barrier(len(prompts))

    def worker(i):
        out = []
        for tok in g.stream(prompts[i], max_new_tokens=50, temperature=1.0, seed=9,
                            ignore_eos=True):
            out.append(tok)
            step.wait(30)
        got[i] = out

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert got == want


def test_one_stream_from_two_threads_is_refused(model_dir):
    g = mambart.Generator(model_dir)
    it = g.stream([1, 2, 3], max_new_tokens=200_000, ignore_eos=True)
    next(it)
    errors = []
    stop = threading.Event()

    def pull():
        try:
            while not stop.is_set():
                next(it)
        except ValueError as e:
            errors.append(str(e))
        except StopIteration:
            pass

    ts = [threading.Thread(target=pull) for _ in range(2)]
    for t in ts:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in ts:
        t.join(30)
    assert errors and "already executing" in errors[0]
    # The Generator is unharmed.
    r1 = g.generate([4, 5], max_new_tokens=20, ignore_eos=True).token_ids
    r2 = mambart.Generator(model_dir).generate([4, 5], max_new_tokens=20, ignore_eos=True).token_ids
    assert r1 == r2


def test_error_in_one_thread_does_not_disturb_others(model_dir):
    g = mambart.Generator(model_dir)
    want = g.generate([3, 4, 5], max_new_tokens=30, temperature=0.9, seed=5,
                      ignore_eos=True).token_ids
    out, errs = [], []

    def good():
        for _ in range(5):
            out.append(g.generate([3, 4, 5], max_new_tokens=30, temperature=0.9, seed=5,
                                  ignore_eos=True).token_ids)

    def bad():
        for _ in range(50):
            try:
                g.generate([3, 400], max_new_tokens=3)
            except ValueError as e:
                errs.append(e)

    ts = [threading.Thread(target=good), threading.Thread(target=bad), threading.Thread(target=good)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert len(errs) == 50 and out == [want] * 10


def test_environment_changes_while_generating(model_dir):
    # An application changes its environment while the runtime's threads work (pytest itself
    # sets PYTEST_CURRENT_TEST at every test phase; Python's os.environ[...] = ... calls
    # putenv). getenv is not safe against a concurrent setenv: the engine's loop once read its
    # options from the environment every step and, in the ASan build, crashed reading the
    # environment array a setenv had just moved. The runtime's threads read a snapshot; this
    # churns the environment (growing it, so the array moves) during two engine generations.
    g = mambart.Generator(model_dir)
    want = g.generate([3, 4, 5], max_new_tokens=40, temperature=0.9, seed=5,
                      ignore_eos=True).token_ids
    out, stop = [], threading.Event()

    def good():
        for _ in range(4):
            out.append(g.generate([3, 4, 5], max_new_tokens=40, temperature=0.9, seed=5,
                                  ignore_eos=True).token_ids)

    def churn():
        names = [f"MAMBART_TEST_ENV_CHURN_{i}" for i in range(300)]
        while not stop.is_set():
            for n in names:
                os.environ[n] = "x" * 64
            for n in names:
                del os.environ[n]

    c = threading.Thread(target=churn)
    c.start()
    try:
        ts = [threading.Thread(target=good) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
    finally:
        stop.set()
        c.join(60)
    assert out == [want] * 8


_INTERRUPT_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    sys.path.insert(0, {here!r})
    import mambart
    g = mambart.Generator({model!r})
    want = g.generate([1, 2, 3], max_new_tokens=40, temperature=0.7, seed=3).token_ids
    for api in ("generate", "stream"):
        t_sig = []
        def fire():
            t_sig.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)
        threading.Timer(0.5, fire).start()
        t0 = time.perf_counter()
        try:
            if api == "generate":
                g.generate([1, 2, 3], max_new_tokens=10**9, ignore_eos=True)
            else:
                for _ in g.stream([1, 2, 3], max_new_tokens=10**9, ignore_eos=True):
                    pass
            print("NOT INTERRUPTED"); sys.exit(3)
        except KeyboardInterrupt:
            lat = time.perf_counter() - t_sig[0]
        print(f"{{api}} interrupted after {{time.perf_counter() - t0:.2f}} s, latency {{lat * 1e3:.1f}} ms")
        assert lat < 0.5, lat
        again = g.generate([1, 2, 3], max_new_tokens=40, temperature=0.7, seed=3).token_ids
        assert again == want, (again, want)
    print("OK")
""")


def test_keyboard_interrupt_stops_generate_promptly(model_dir, tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(_INTERRUPT_SCRIPT.format(here=HERE, model=str(model_dir)))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr
    print(p.stdout)


def test_generator_usable_after_exception_mid_stream(model_dir):
    """An exception raised by the consumer of a stream (as KeyboardInterrupt would be) leaves
    the Generator's next calls correct; the abandoned stream is freed."""
    g = mambart.Generator(model_dir)
    want = g.generate([9, 8, 7], max_new_tokens=25, temperature=1.0, seed=11).token_ids

    class Stop(Exception):
        pass

    for _ in range(20):
        with pytest.raises(Stop):
            for i, _tok in enumerate(g.stream([1, 2], max_new_tokens=1000, ignore_eos=True)):
                if i == 17:
                    raise Stop
    assert g.generate([9, 8, 7], max_new_tokens=25, temperature=1.0, seed=11).token_ids == want


def test_sigint_during_threads(model_dir):
    """KeyboardInterrupt reaches the main thread while worker threads generate; the workers
    finish correctly."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    g = mambart.Generator(model_dir)
    want = g.generate([1, 2], max_new_tokens=300, ignore_eos=True).token_ids
    got = []
    ts = [threading.Thread(target=lambda: got.append(
        g.generate([1, 2], max_new_tokens=300, ignore_eos=True).token_ids)) for _ in range(3)]
    for t in ts:
        t.start()
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            g.generate([5], max_new_tokens=10**9, ignore_eos=True)
    finally:
        signal.signal(signal.SIGINT, old)
    for t in ts:
        t.join(60)
    assert got == [want] * 3


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc")
def test_runtime_threads_block_asynchronous_signals(model_dir):
    """The engine's thread and the CPU pool's workers (named mambart-engine, mambart-cpu) block
    SIGINT / SIGTERM (cpp/threads.h): a signal sent to the process reaches the application's
    threads (Python's main thread), never a runtime thread."""
    def tasks():
        out = set()
        for t in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{t}/comm") as f:
                    if f.read().strip() in ("mambart-engine", "mambart-cpu"):
                        out.add(t)
            except OSError:  # the thread ended meanwhile
                pass
        return out

    def blocked(tid):
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("SigBlk:"):
                    return int(line.split()[1], 16)
        return 0

    before = tasks()
    g = mambart.Generator(model_dir, threads=2)
    # a 32-token prompt: its GEMMs are parallel jobs, which start the pool's worker
    g.generate([1 + i % 20 for i in range(32)], max_new_tokens=4)
    # A thread just created (glibc's pthread_create) starts with every signal blocked and its
    # creator's name until its start routine runs: a worker that the engine's thread started
    # may not have been scheduled yet on a busy machine. Wait (10 s at most) until every one
    # has started: named, and its own mask in place.
    def check():
        ours = sorted(tasks() - before)
        bad = []
        for tid in ours:
            mask = blocked(tid)
            if not all(mask & (1 << (sig - 1)) for sig in (signal.SIGINT, signal.SIGTERM)) \
                    or mask & (1 << (signal.SIGSEGV - 1)):
                bad.append((tid, hex(mask)))
        return ours, bad

    deadline = time.monotonic() + 10
    ours, bad = check()
    while bad and time.monotonic() < deadline:
        time.sleep(0.01)
        ours, bad = check()
    assert len(ours) >= 2, ours  # this generator's engine thread and its pool's worker
    assert not bad, bad  # SIGINT and SIGTERM blocked, SIGSEGV open
    main_mask = blocked(threading.get_native_id())
    assert not main_mask & (1 << (signal.SIGINT - 1))
    del g
