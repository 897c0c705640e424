"""`ardeploy triton` against a real Triton Inference Server: the `tritonserver` binary and Python backend of
the nvidia-pytriton wheel, on 127.0.0.1 only, queried with `tritonclient` over HTTP and gRPC (streaming), and
Triton's HTTP generate_stream endpoint. The tokens must equal `ardeploy generate`'s.

The wheel's Python-backend stub is built against numpy 1.x (nvidia-pytriton requires numpy<2): where this
environment has numpy 2, the server's Python gets an overlay environment whose only package is numpy<2
(fetched once into ~/.cache/ardeploy) in front of this environment's packages.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import numpy as np
import pytest

from conftest import one_line_error

grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[http,grpc] (the test extra)")
httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http,grpc] (the test extra)")
try:                                       # the openai client's HTTP library (httpx2 since openai 3)
    import httpx2 as httpx
except ImportError:
    import httpx

PROMPT = "hello there"            # the tiny model's greedy answer to it has 10 different tokens in 12
STARTUP_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stub_python(workdir: Path) -> Path:
    """A `python3` for the Python backend's stub: this environment, with numpy<2 in front if it has numpy 2."""
    if int(np.__version__.split(".")[0]) < 2:
        return Path(sys.executable).parent
    from ardeploy.runtime.files import cache_dir
    numpy1 = cache_dir() / "triton-numpy1"
    if not (numpy1 / "numpy").exists():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(numpy1), "numpy<2"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.skip(f"the wheel's Python backend needs numpy<2 and pip could not fetch it: {done.stderr[-300:]}")
    overlay = workdir / "stub-env"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(overlay)
    site = next((overlay / "lib").glob("python3*/site-packages"))
    for item in numpy1.iterdir():
        if item.name.startswith("numpy"):
            os.symlink(item, site / item.name)
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "zz_ardeploy_env.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return overlay / "bin"


class TritonServer:
    def __init__(self, repo: Path, workdir: Path):
        from ardeploy.serve.triton import backend_folder, wheel_server
        self.ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        backends = backend_folder(workdir, f"{sys.version_info.major}.{sys.version_info.minor}")
        env = {**os.environ, "PATH": f"{stub_python(workdir)}{os.pathsep}{os.environ['PATH']}"}
        command = [str(wheel_server() / "bin" / "tritonserver"), "--model-repository", str(repo),
                   "--backend-directory", str(backends), "--exit-timeout-secs", "10", "--log-verbose", "0"]
        for kind, port in self.ports.items():
            command += [f"--{kind}-address", "127.0.0.1", f"--{kind}-port", str(port)]
        self.log_path = workdir / "tritonserver.log"
        self.proc = subprocess.Popen(command, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, env=env)
        self.http = f"127.0.0.1:{self.ports['http']}"
        self.grpc = f"127.0.0.1:{self.ports['grpc']}"
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(f"http://{self.http}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        log = self.log()
        self.stop()
        raise AssertionError(f"tritonserver did not become ready:\n{log[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def repository(tiny_chat_bundle, tmp_path_factory):
    from ardeploy.cli import main
    repo = tmp_path_factory.mktemp("triton") / "models"
    assert main(["triton", str(tiny_chat_bundle), "--out", str(repo), "--name", "tiny", "--threads", "1"]) == 0
    assert main(["triton", str(tiny_chat_bundle), "--out", str(repo), "--name", "tiny_whole", "--no-decoupled",
                 "--threads", "1", "--max-queue", "8"]) == 0
    return repo


@pytest.fixture(scope="module")
def triton(repository, tmp_path_factory):
    try:
        from ardeploy.serve.triton import wheel_server
        wheel_server()
    except Exception as e:                             # noqa: BLE001
        pytest.skip(f"no tritonserver here: {e} (.ci/run installs nvidia-pytriton)")
    server = TritonServer(repository, tmp_path_factory.mktemp("triton_run"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def generate_ids(tiny_chat_bundle, tmp_path_factory):
    """The greedy token ids `ardeploy generate --chat --greedy --json` prints."""
    from ardeploy.cli import main
    out = tmp_path_factory.mktemp("generate") / "out.json"
    saved, sys.stdout = sys.stdout, open(out, "w")
    try:
        assert main(["generate", str(tiny_chat_bundle), "--chat", "--greedy", "--max-new-tokens", "12", "--json",
                     "--threads", "1", "--quiet", "--prompt", PROMPT]) == 0
    finally:
        sys.stdout.close()
        sys.stdout = saved
    return json.loads(out.read_text())


def inputs(module, max_tokens: int = 12, text: str = PROMPT):
    tensors = []
    for name, value, kind in (("text_input", np.array([text.encode()], dtype=np.object_), "BYTES"),
                              ("chat", np.array([True]), "BOOL"),
                              ("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"),
                              ("temperature", np.array([0.0], dtype=np.float32), "FP32")):
        tensor = module.InferInput(name, list(value.shape), kind)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def test_repository_layout_and_config(repository, tiny_chat_bundle):
    model = repository / "tiny"
    config = (model / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "decoupled: true" in config and "max_batch_size: 0" in config
    assert 'key: "max_batch" value: { string_value: "4" }' in config            # the bundle's --max-batch
    assert "count: 1 kind: KIND_CPU" in config
    assert "decoupled: false" in (repository / "tiny_whole" / "config.pbtxt").read_text()
    assert "ardeploy.serve.triton_model" in (model / "1" / "model.py").read_text()
    weights = model / "1" / "bundle" / "weights.bin"
    assert weights.stat().st_ino == (Path(tiny_chat_bundle) / "weights.bin").stat().st_ino    # linked, not copied


def test_grpc_stream_gives_the_tokens_of_ardeploy_generate(triton, generate_ids):
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("tiny", inputs(grpcclient), request_id="r1")
        ids, text, finish = [], "", None
        while finish is None:
            result, error = responses.get(timeout=60)
            assert error is None, error
            ids += result.as_numpy("output_ids").tolist()
            text += result.as_numpy("text_output")[0].decode()
            finish = result.as_numpy("finish_reason")[0].decode() or None
        assert result.get_response().parameters["triton_final_response"].bool_param
        assert (ids, text, finish) == (generate_ids["token_ids"], generate_ids["text"], "length")
        # a request without a prompt: an error answer, and the stream stays usable
        bad = grpcclient.InferInput("max_tokens", [1], "INT32")
        bad.set_data_from_numpy(np.array([4], dtype=np.int32))
        client.async_stream_infer("tiny", [bad], request_id="r2")
        result, error = responses.get(timeout=60)
        assert error is not None and "text_input or input_ids" in str(error)
    finally:
        client.stop_stream()
        client.close()


def test_http_and_grpc_infer_give_the_tokens_of_ardeploy_generate(triton, generate_ids):
    http = httpclient.InferenceServerClient(triton.http)
    assert http.is_model_ready("tiny") and http.is_model_ready("tiny_whole")
    answer = http.infer("tiny_whole", inputs(httpclient))
    assert answer.as_numpy("output_ids").tolist() == generate_ids["token_ids"]
    assert answer.as_numpy("text_output")[0].decode() == generate_ids["text"]
    assert answer.as_numpy("finish_reason")[0].decode() == "length"
    grpc = grpcclient.InferenceServerClient(triton.grpc)
    assert grpc.infer("tiny_whole", inputs(grpcclient)).as_numpy("output_ids").tolist() == generate_ids["token_ids"]
    grpc.close()
    http.close()


def test_http_generate_stream_endpoint(triton, generate_ids):
    body = {"text_input": PROMPT, "chat": True, "max_tokens": 12, "temperature": 0.0}
    ids, finish = [], None
    with httpx.stream("POST", f"http://{triton.http}/v2/models/tiny/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                ids += event["output_ids"] if isinstance(event["output_ids"], list) else [event["output_ids"]]
                finish = event["finish_reason"] or finish
    assert ids == generate_ids["token_ids"] and finish == "length"


def test_triton_command_bad_input_is_one_line(tiny_chat_bundle, repository, capsys):
    from ardeploy.cli import main
    one_line_error(main(["triton", str(tiny_chat_bundle), "--out", str(repository), "--name", "tiny"]), capsys,
                   "already exists", "--force")
    one_line_error(main(["triton", str(tiny_chat_bundle), "--out", str(repository), "--name", "x",
                         "--max-batch", "9"]), capsys, "--max-batch 9")
    one_line_error(main(["triton", str(tiny_chat_bundle), "--out", str(repository), "--name", "a/b"]), capsys,
                   "--name")
    one_line_error(main(["triton", str(tiny_chat_bundle), "--out", str(repository), "--name", "y",
                         "--instances", "0"]), capsys, "--instances")
    (repository / "other").mkdir()
    (repository / "other" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    one_line_error(main(["triton", str(tiny_chat_bundle), "--out", str(repository), "--name", "other", "--force"]),
                   capsys, "not a model")
    assert (repository / "other" / "config.pbtxt").read_text() == 'backend: "onnxruntime"\n'
    assert not (repository / "x").exists() and not (repository / "y").exists()
