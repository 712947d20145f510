"""`mambart serve-ray` (issue 17): the OpenAI server as Ray Serve replicas. A local Ray instance
(CPU) runs 2 replicas of a tiny model; the real `openai` client talks to Ray's HTTP proxy.

ray[serve] is not a test dependency (it is large): this test skips where ray is not installed,
and .ci/run installs ray[serve] and runs it again with a skip counted as a failure."""

from __future__ import annotations

import asyncio
import time

import pytest

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install "
                                        "\"mambart[ray]\"); .ci/run installs it and runs this")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import mambart  # noqa: E402
from ckpt_utils import serve_model_dir  # noqa: E402
from mambart.serve import ServeConfig, bind  # noqa: E402


def test_two_replicas_answer_the_openai_client_through_rays_proxy(tmp_path):
    from mambart.serve_ray import application

    d = serve_model_dir(tmp_path / "tiny")
    ref = mambart.Generator(d)
    s = bind("127.0.0.1", 0)
    port = s.getsockname()[1]
    s.close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = application(str(d), ServeConfig(model_name="tiny", max_tokens=64), replicas=2,
                          num_cpus=0.5)
        serve.run(app, name="mambart", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1"
        with openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=60) as c:
            for p in ("The future of AI is", "Once upon a time"):
                r = c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
                assert r.choices[0].text == ref.generate(p, max_new_tokens=12).text
            chunks = list(c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                temperature=0, stream=True))
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")
            with pytest.raises(openai.BadRequestError):
                c.completions.create(model="other", prompt="x", max_tokens=2)

        async def many():
            async with openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0,
                                          timeout=60) as ac:
                rs = await asyncio.gather(*[ac.completions.create(
                    model="tiny", prompt=f"Numbers: {i}", max_tokens=8, temperature=0)
                    for i in range(16)])
            return [r.choices[0].text for r in rs]

        assert asyncio.run(many()) == [ref.generate(f"Numbers: {i}", max_new_tokens=8).text
                                       for i in range(16)]
        # Both replicas serve: Ray's proxy spreads requests (each /health names its process).
        # The proxy's router learns of replicas asynchronously (a long poll from the
        # controller), so on a loaded machine it may still route to one replica for a while
        # after the application reports ready: ask until both have answered or 60 s pass.
        pids: set = set()
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            pids.add(httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()["pid"])
            if len(pids) < 2:
                time.sleep(0.05)
        assert len(pids) == 2, pids
        st = serve.status().applications["mambart"]
        assert st.status == "RUNNING"
        assert st.deployments["mambart"].replica_states.get("RUNNING") == 2
    finally:
        serve.shutdown()
        ray.shutdown()
