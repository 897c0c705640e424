"""runtime/trt_compat.py touches only names that each TensorRT flavour's real Python bindings have.

Full TensorRT's libraries are not installable from PyPI, but its bindings wheels (tensorrt-cu12-bindings)
are real. They import against stub libnvinfer/libnvonnxparser/libnvinfer_plugin libraries (a few
lines of C compiled here), which is enough for the classes and enums to exist. Every call in
compat then runs against "strict" stand-ins built from those real classes: reading, calling or
setting a member the class does not have fails, and a call returns a stand-in of the class its
docstring names. The TensorRT backend's per-step calls (`TrtBackend._run`) run the same way.
TensorRT-RTX is checked the same way with its real, installed bindings (the build tests use them for real).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

FULL_VERSIONS = ["10.3.0", "10.13.3.9", "11.4.0.106"]     # JetPack 6.2, JetPack 7.x, datacenter/desktop

STUB_C = """
#include <stddef.h>
void* createInferBuilder_INTERNAL(void* a, int b){return NULL;}
void* createInferRefitter_INTERNAL(void* a, void* b, int c){return NULL;}
void* createInferRuntime_INTERNAL(void* a, int b){return NULL;}
void* createNvOnnxParserRefitter_INTERNAL(void* a, void* b, int c){return NULL;}
void* createNvOnnxParser_INTERNAL(void* a, void* b, int c){return NULL;}
void* getBuilderPluginRegistry(int a){return NULL;}
int getNvOnnxParserVersion(void){return 0;}
void* getPluginRegistry(void){return NULL;}
int initLibNvInferPlugins(void* a, const char* b){return 0;}
"""


# -- strict stand-ins ------------------------------------------------------------------------------------
class Anything(int):
    """What a call returns when its docstring names no TensorRT class: 1, truthy, iterable and empty."""

    def __new__(cls):
        return int.__new__(cls, 1)

    def __getattr__(self, name):
        return Anything()

    def __call__(self, *a, **k):
        return Anything()

    def __iter__(self):
        return iter(())


def _return_class(doc: str, mod):
    m = re.search(r"->\s*([\w.]+)", (doc or "").splitlines()[0] if doc else "")
    if not m:
        return None
    name = m.group(1).rsplit(".", 1)[-1]
    cls = getattr(mod, name, None)
    return cls if isinstance(cls, type) and m.group(1).count(".") >= 1 and "tensorrt" in m.group(1) else None


class Strict:
    def __init__(self, cls, mod, version):
        object.__setattr__(self, "_s", (cls, mod, version))

    def _missing(self, name):
        cls, _, version = self._s
        return AttributeError(f"TensorRT {version}: {cls.__name__} has no member {name!r}")

    def __getattr__(self, name):
        cls, mod, version = self._s
        if not hasattr(cls, name):
            raise self._missing(name)
        attr = getattr(cls, name)
        if isinstance(attr, property) or not callable(attr):
            return Anything()
        ret = _return_class(attr.__doc__, mod)
        return lambda *a, **k: Strict(ret, mod, version) if ret is not None else Anything()

    def __setattr__(self, name, value):
        if not hasattr(self._s[0], name):
            raise self._missing(name)

    def __str__(self):
        return self._s[0].__name__


class FakeModule:
    """The real bindings module, except that its factories return strict stand-ins."""
    FACTORIES = ("Builder", "OnnxParser", "Runtime")

    def __init__(self, real, version):
        self._real, self._version = real, version

    def __getattr__(self, name):
        attr = getattr(self._real, name)          # AttributeError: the module lacks the name
        if name in self.FACTORIES:
            return lambda *a, **k: Strict(attr, self._real, self._version)
        return attr


def exercise(flavour: str) -> list[str]:
    """Run every compat function (and the backend's step) against strict stand-ins of `flavour`'s classes."""
    from ardeploy.runtime import trt_compat as compat
    from ardeploy.runtime.errors import EngineError
    from ardeploy.engines.progress import make_monitor
    from ardeploy.runtime.backends.base import Backend
    from ardeploy.runtime.backends.trt import TrtBackend
    from ardeploy.runtime.bundle import Bundle
    from ardeploy.runtime.kv_arena import KVArena

    real = compat.load(flavour)
    mod = FakeModule(real.mod, real.version)
    t = compat.TensorRT(mod, real.flavour, real.version)
    S = lambda name: Strict(getattr(real.mod, name), real.mod, real.version)   # noqa: E731
    done = []
    log = compat.logger(t)
    builder, network, config = compat.new_network(t, log)
    done.append(f"network flags {compat.network_flags(t)}, strongly typed {compat.is_strongly_typed(t, network)}")
    parser, problems = compat.parse_onnx(t, network, log, "model.onnx")
    done.append(f"parse problems {[str(p) for p in problems]}")
    if t.is_rtx:
        ccs = compat.compute_capabilities(t, ["8.6", "sm89", "12.0"])
    else:
        try:
            compat.compute_capabilities(t, ["8.9"])
            raise AssertionError("full TensorRT has no compute capability option")
        except EngineError:
            ccs = []
    compat.configure(t, config, workspace=1 << 30, opt_level=0, ccs=ccs)
    compat.add_profile(t, builder, config, {"input_ids": ((1, 1), (1, 8), (2, 16))})
    if compat.has_timing_cache(t):
        compat.attach_timing_cache(t, config, b"")
    monitor = make_monitor(compat.progress_base(t))
    compat.attach_progress(config, monitor)
    monitor.phase_start("Building engine", None, 2)
    assert monitor.step_complete("Building engine", 0) is True
    monitor.phase_finish("Building engine")
    done.append(f"io {compat.network_io(t, network)}, {len(compat.network_layers(t, network))} layer(s)")
    plan = compat.build(t, builder, network, config)
    rt = compat.runtime(t, log)
    if t.is_rtx:                                  # called for real in test_engines_build (returns a tuple)
        assert callable(rt.get_engine_validity)
    else:
        assert compat.engine_validity(t, rt, b"") is None
    engine = compat.deserialize(t, rt, plan)
    compat.profile_memory(t, engine, 0)
    cache = compat.new_runtime_cache(t, engine, b"x")
    if cache is not None:
        cache.serialize()                         # what serialize_runtime_cache calls
    ctx = compat.create_context(t, engine, 1, 4096, 1024, 0, cache, cuda_graphs=t.is_rtx)
    assert ctx is not None
    done.append(f"engine io {compat.engine_io(t, engine)}")
    compat.inspector_json(t, engine, ctx)
    # the backend's per-step calls on an execution context
    sys.path.insert(0, str(Path(__file__).parent))
    from test_engines_binding import HostCuda
    backend = object.__new__(TrtBackend)
    Backend.__init__(backend)
    backend.tensorrt, backend.cuda = t, HostCuda()
    backend.bundle = Bundle(Path("."), {"spec": {"n_layers": 1, "vocab_size": 8, "n_kv_heads": 1, "head_dim": 64},
                                        "kv_dtype": "float16", "max_seq": 8, "max_batch": 1})
    backend._allocate_io(8, 1)
    backend.contexts = [S("IExecutionContext"), S("IExecutionContext")]
    arena = KVArena(1, 8, 1, 1, 64, np.float16, lambda n, dt: (None, backend.cuda.malloc(n * 2)))
    backend._run(np.ones((1, 3), np.int64), np.ones((1, 3), np.int64), arena, 0)
    backend._run(np.ones((1, 1), np.int64), np.ones((1, 4), np.int64), arena, 1)
    done.append(f"backend steps ok, arena length {arena.length}")
    return done


def test_compat_against_tensorrt_rtx_bindings():
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX bindings not installed")
    done = exercise("tensorrt_rtx")
    assert any("backend steps ok" in d for d in done)


# -- full TensorRT over stub libraries ---------------------------------------------------------------------
def _bindings_dir(version: str) -> Path:
    """The extracted tensorrt-cu12-bindings wheel and stub libraries (downloaded once, cached)."""
    cache = Path(os.environ.get("ARDEPLOY_CACHE") or Path.home() / ".cache" / "ardeploy") / "trt-bindings" / version
    if (cache / "ok").exists():
        return cache
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler to make stub TensorRT libraries")
    shutil.rmtree(cache, ignore_errors=True)
    (cache / "stubs").mkdir(parents=True)
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", py,
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "-d", str(cache), f"tensorrt-cu12-bindings=={version}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wheels = list(cache.glob("*.whl"))
    if r.returncode or not wheels:
        pytest.skip(f"could not download tensorrt-cu12-bindings=={version} from PyPI: {r.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(cache / "site")
    (cache / "stubs" / "stub.c").write_text(STUB_C)
    for major in ("10", "11"):
        for lib in ("libnvinfer", "libnvinfer_plugin", "libnvonnxparser"):
            subprocess.run([cc, "-shared", "-fPIC", "-o", str(cache / "stubs" / f"{lib}.so.{major}"),
                            f"-Wl,-soname,{lib}.so.{major}", str(cache / "stubs" / "stub.c")], check=True)
    (cache / "ok").write_text("")
    return cache


@pytest.mark.parametrize("version", FULL_VERSIONS)
def test_compat_against_full_tensorrt_bindings(version):
    d = _bindings_dir(version)
    script = ("import sys, importlib; sys.modules['tensorrt'] = importlib.import_module('tensorrt_bindings'); "
              f"sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_engines_compat as m; "
              "print('\\n'.join(m.exercise('tensorrt')))")
    env = dict(os.environ, PYTHONPATH=str(d / "site"), LD_LIBRARY_PATH=str(d / "stubs"))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "backend steps ok" in r.stdout
    assert "network flags 0" in r.stdout if version.startswith("11") else "network flags 2" in r.stdout
