"""The lm-evaluation-harness adapter (issue 7), on a tiny model with a trained tokenizer.

The adapter's three request types run against stand-in requests that carry the same `.args`
tuples lm-eval's Instances do, checked against transformers' log-softmax on the same weights
(always). Where lm-eval is installed, a tiny local multiple-choice task also runs through
lm_eval.simple_evaluate and through the documented command line (offline); otherwise those
tests are skipped (lm-eval is not a test dependency: it pulls datasets, scikit-learn, ...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import mambart
from ckpt_utils import train_tokenizer
from hf_models import build, mamba1_config
from mambart.lm_eval_adapter import MambartLM

V = 300


class Req:  # the part of lm_eval.api.instance.Instance the adapter reads
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lme")
    tok = train_tokenizer(root / "tokenizer.json", vocab_size=V)
    model = build(mamba1_config(vocab_size=V), root / "hf", seed=6)
    d = mambart.convert(root / "hf", root / "m")
    g = mambart.Generator(d, tokenizer=str(tok))
    return MambartLM(generator=g), model, root, d, tok


def hf_logprob(model, ids, start, greedy=False):
    """sum of log p(ids[t] | ids[:t]) for t >= start, transformers in float64 log-softmax (and
    whether every such token is the argmax)."""
    with torch.no_grad():
        lg = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(lg, -1)
    total = float(sum(lp[t - 1, ids[t]] for t in range(start, len(ids))))
    if greedy:
        return total, all(int(lg[t - 1].argmax()) == ids[t] for t in range(start, len(ids)))
    return total


def test_loglikelihood_equals_transformers(setup):
    lm, model, *_ = setup
    reqs = [Req("The quick brown fox", " jumps over the lazy dog"),
            Req("The quick brown fox ", "jumps"),  # trailing space moves to the continuation
            Req("Hello", " world, hello"),
            Req("The quick brown fox", " sleeps")]
    out = lm.loglikelihood(reqs)
    for r, (ll, greedy) in zip(reqs, out):
        ctx, cont = lm._encode_pair(*r.args)
        assert ctx and cont
        want, want_greedy = hf_logprob(model, ctx + cont, len(ctx), greedy=True)
        assert ll == pytest.approx(want, abs=2e-3)
        assert greedy is want_greedy
    # The greedy flag's true case (the random model's continuations above are not greedy): the
    # model's own next token, scored from the context's state as loglikelihood does.
    ctx = lm.tok_encode("The quick brown fox")
    nxt = lm.g.generate(ctx, max_new_tokens=1, ignore_eos=True).token_ids
    res = lm.g.score(nxt, state=lm.g.prefill(ctx))
    assert res.is_greedy and hf_logprob(model, ctx + nxt, len(ctx), greedy=True)[1]
    assert out[1][0] == pytest.approx(lm.loglikelihood([Req("The quick brown fox", " jumps")])[0][0],
                                      abs=1e-6)
    # Interleaved contexts: results come back in request order, each as if asked alone.
    mixed = [reqs[0], reqs[2], reqs[3], Req("", "Hello")]
    assert lm.loglikelihood(mixed) == [lm.loglikelihood([r])[0] for r in mixed]
    # Empty context: the end-of-text token is the context.
    (ll, _), = lm.loglikelihood([Req("", "Hello world")])
    ids = lm.tok_encode("Hello world")
    assert ll == pytest.approx(hf_logprob(model, [lm.eot_token_id] + ids, 1), abs=2e-3)


def test_loglikelihood_rolling_equals_transformers(setup):
    lm, model, *_ = setup
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello"]
    out = lm.loglikelihood_rolling([Req(t) for t in texts])
    for t, ll in zip(texts, out):
        ids = [lm.eot_token_id] + lm.tok_encode(t)
        assert ll == pytest.approx(hf_logprob(model, ids, 1), abs=2e-3)


def test_generate_until(setup):
    lm, *_ = setup
    ctx = "The quick brown fox"
    free = lm.g.generate(ctx, max_new_tokens=12, ignore_eos=True).text
    out = lm.generate_until([Req(ctx, {"until": [], "max_gen_toks": 12})])
    g_out = lm.g.generate(ctx, max_new_tokens=12).text  # eos applies in both
    assert out == [g_out] and free.startswith(g_out)
    if len(free) > 3:
        stop = free[2:4]
        cut = lm.generate_until([Req(ctx, {"until": [stop], "max_gen_toks": 12})])[0]
        assert cut == free[:free.index(stop)]
    sampled = lm.generate_until([Req(ctx, {"max_gen_toks": 6, "do_sample": True,
                                           "temperature": 1.0})] * 2)
    assert sampled[0] == sampled[1]  # seeded


def test_adapter_arguments(setup):
    _, _, root, d, tok = setup
    with pytest.raises(ValueError, match="pretrained"):
        MambartLM()
    with pytest.raises(ValueError, match="tokenizer"):
        MambartLM(pretrained=str(d))
    lm = MambartLM(pretrained=str(d), tokenizer=str(tok), batch_size=1, max_batch_size=None)
    assert lm.loglikelihood([Req("Hello", " world")])[0][0] < 0


# ---------------------------------------------------------------- with lm-eval itself

def _task(root):
    data = root / "mc.jsonl"
    rows = [{"question": "The quick brown", "choices": [" fox", " dog", " cat"], "answer": 0},
            {"question": "Hello", "choices": [" world", " there"], "answer": 1},
            {"question": "The lazy", "choices": [" dog", " fox"], "answer": 0}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "mambart_tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: mambart_tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        target_delimiter: ""
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    return rows, tasks


def _expected_acc(lm, rows):
    hits = 0
    for r in rows:
        lls = [ll for ll, _ in lm.loglikelihood([Req(r["question"], c) for c in r["choices"]])]
        hits += int(np.argmax(lls) == r["answer"])
    return hits / len(rows)


def test_simple_evaluate_on_a_local_task(setup, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm, _, root, *_ = setup
    rows, tasks = _task(root)
    res = lm_eval.simple_evaluate(model=lm, tasks=["mambart_tiny_mc"],
                                  task_manager=TaskManager(include_path=str(tasks)))
    acc = res["results"]["mambart_tiny_mc"]["acc,none"]
    assert acc == pytest.approx(_expected_acc(lm, rows))


def test_documented_command_line(setup, tmp_path):
    pytest.importorskip("lm_eval")
    lm, _, root, d, tok = setup
    rows, tasks = _task(root)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "mambart.lm_eval_adapter", "--model", "mambart", "--model_args",
         f"pretrained={d},tokenizer={tok}", "--device", "cpu", "--tasks", "mambart_tiny_mc", "--include_path",
         str(tasks), "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    files = list((tmp_path / "out").rglob("results*.json"))
    assert files, out.stdout[-2000:]
    acc = json.loads(files[0].read_text())["results"]["mambart_tiny_mc"]["acc,none"]
    assert acc == pytest.approx(_expected_acc(lm, rows))
