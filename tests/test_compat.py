"""The supported DeepSpeed releases: the range is declared once and checked at import, and the policy for the next
minor release; the places where releases differ behave alike on the one installed."""

from __future__ import annotations

import base64
import configparser
import json
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest
import torch

import ds_pipe_ext
from ds_pipe_ext import compat
from ds_pipe_ext.compat import ALLOW_UNTESTED_ENV, UnsupportedDeepSpeedError, UntestedDeepSpeedWarning, check_deepspeed

ROOT = Path(__file__).resolve().parents[1]
RANGE = ">=0.17.0,<0.20"


def test_the_range_is_declared_once_and_the_installed_release_is_in_it():
    assert ds_pipe_ext.SUPPORTED_DEEPSPEED == compat.SUPPORTED_DEEPSPEED == RANGE
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requirements = setup["options"]["install_requires"].split("\n")
    assert f"deepspeed{RANGE}" in requirements
    # What the check reads (package metadata) is the DeepSpeed that imports, also with a second one on PYTHONPATH.
    assert compat.installed_deepspeed() == deepspeed.__version__
    assert check_deepspeed() == deepspeed.__version__


def test_the_readme_names_the_range_and_the_tested_releases():
    readme = (ROOT / "README.md").read_text()
    assert f"`{RANGE}`" in readme and ALLOW_UNTESTED_ENV in readme
    assert all(release in readme for release in compat.TESTED_DEEPSPEED)


@pytest.mark.parametrize("version", ["0.17.0", "0.17.6", "0.18.9", "0.19.8", "0.19.12", "0.19.8+cpu", "0.18.0rc1"])
def test_supported_releases_run(version):
    assert check_deepspeed(version, environ={}) == version


@pytest.mark.parametrize("version", ["0.16.9", "0.9.5", "0.3.16"])
def test_older_releases_are_refused_even_when_untested_ones_are_allowed(version):
    with pytest.raises(UnsupportedDeepSpeedError, match=rf"supports DeepSpeed {RANGE}; DeepSpeed {version} is older"):
        check_deepspeed(version, environ={ALLOW_UNTESTED_ENV: "1"})


@pytest.mark.parametrize("version", ["0.20.0", "0.20.0rc1", "0.21.3", "1.0.0"])
def test_the_next_minor_release_is_refused_unless_allowed_and_then_warned_about(version):
    message = rf"supports DeepSpeed {RANGE}; DeepSpeed {version} is newer and untested .*{ALLOW_UNTESTED_ENV}=1"
    for environ in ({}, {ALLOW_UNTESTED_ENV: "0"}, {ALLOW_UNTESTED_ENV: ""}):
        with pytest.raises(UnsupportedDeepSpeedError, match=message):
            check_deepspeed(version, environ=environ)
    with pytest.warns(UntestedDeepSpeedWarning, match=rf"DeepSpeed {version}, outside the tested {RANGE}"):
        assert check_deepspeed(version, environ={ALLOW_UNTESTED_ENV: "1"}) == version


def test_a_missing_deepspeed_is_named(monkeypatch):
    monkeypatch.setattr(compat, "installed_deepspeed", lambda: None)
    with pytest.raises(ImportError, match=rf"needs DeepSpeed {RANGE}, not installed: pip install 'deepspeed{RANGE}'"):
        check_deepspeed(environ={})


def import_with_deepspeed_version(version: str, allow: str | None = None) -> subprocess.CompletedProcess:
    """``import ds_pipe_ext`` in a fresh interpreter whose package metadata says DeepSpeed is ``version``."""
    script = (
        "import importlib.metadata as metadata, sys\n"
        "real = metadata.version\n"
        f"metadata.version = lambda name: {version!r} if name == 'deepspeed' else real(name)\n"
        "import ds_pipe_ext\n"
        "print('imported; deepspeed loaded:', 'deepspeed' in sys.modules)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    if allow is not None:
        env[ALLOW_UNTESTED_ENV] = allow
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)


def test_importing_the_package_checks_the_installed_release_without_importing_deepspeed():
    result = import_with_deepspeed_version("0.20.1")
    assert result.returncode == 1
    refused = f"UnsupportedDeepSpeedError: ds_pipe_ext supports DeepSpeed {RANGE}; DeepSpeed 0.20.1 is newer"
    assert refused in result.stderr
    allowed = import_with_deepspeed_version("0.20.1", allow="1")
    assert allowed.returncode == 0, allowed.stderr
    assert "imported; deepspeed loaded: False" in allowed.stdout
    assert "UntestedDeepSpeedWarning: ds_pipe_ext runs on DeepSpeed 0.20.1" in allowed.stderr
    assert "imported; deepspeed loaded: False" in import_with_deepspeed_version("0.17.0").stdout


def test_the_cli_help_does_not_import_deepspeed():
    script = (
        "import sys\n"
        "from ds_pipe_ext.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('deepspeed loaded:', 'deepspeed' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "deepspeed loaded: False" in result.stdout, result.stderr


# ---- the differences, on the installed release -----------------------------------------------------------------------


def test_configs_read_as_deepspeed_reads_them_on_every_release(tmp_path):
    config = {"train_batch_size": 4, "optimizer": {"type": "Adam", "params": {"lr": 0.1}}}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    encoded = base64.urlsafe_b64encode(json.dumps(config).encode()).decode()
    for read in (compat.load_ds_config, compat._load_ds_config):  # DeepSpeed's where it has one, and ours
        assert read(str(path)) == read(encoded) == read(config) == config
        with pytest.raises(ValueError, match="Expected a string path to an existing deepspeed config"):
            read("no/such/file.json")
    path.write_text('{"train_batch_size": 4, "train_batch_size": 8}')
    with pytest.raises(ValueError, match="Duplicate keys in DeepSpeed config"):
        compat._load_ds_config(str(path))


def test_deepspeed_gets_a_copy_of_the_config_dict():
    config = {"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}
    copied = compat.config_for_deepspeed(config)
    copied["optimizer"]["params"].pop("torch_adam")
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert compat.config_for_deepspeed("ds_config.json") == "ds_config.json"


def test_dualpipev_is_there_or_its_absence_is_named():
    has_it = Path(deepspeed.__file__).with_name("runtime").joinpath("pipe", "dualpipev.py").exists()
    assert not compat.is_dualpipev_module(torch.nn.Linear(1, 1))
    if has_it:
        assert compat.dualpipev().DualPipeVModule
    else:
        with pytest.raises(UnsupportedDeepSpeedError, match=r"DualPipeV .* from 0\.19\.8 on; this is DeepSpeed 0\.1"):
            compat.dualpipev("schedule 'dualpipev'")


def test_deepspeeds_own_pipeline_scales_as_its_release_does():
    scale = compat.stock_pipeline_gradient_scale(stages=3, accumulation_steps=4)
    assert scale in ([1.0] * 3, [1 / 16, 1 / 16, 1 / 4], [1 / 4] * 3)
    if compat.release(deepspeed.__version__) >= (0, 19, 3):
        assert scale == [1 / 4] * 3
    elif compat.release(deepspeed.__version__) < (0, 18, 3):
        assert scale == [1.0] * 3


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_the_split_backwards_loss_is_divided_once_and_scaled_as_engine_backward_scales_it(steps):
    """The last stage's I starts from the loss divided by the accumulation steps once (by the loss, or by DeepSpeed's
    hook on the stage output, as ``engine.backward`` does on this release) and scaled by ``engine.scale``."""
    from types import SimpleNamespace

    engine = SimpleNamespace(
        gradient_accumulation_steps=lambda: steps,
        is_last_stage=lambda: True,
        enable_backward_allreduce=False,
        scale=lambda loss: loss * 1024.0,  # what engine.scale does with fp16 and ZeRO: the loss scaler's power of 2
    )
    x = torch.tensor([1.5, -2.0, 0.1], requires_grad=True)
    output = x * 3.0
    if compat._output_hook_scales():  # DeepSpeed's hook on a stage output, as SchedulePipelineEngine overrides it
        output.register_hook(lambda grad: compat.stage_output_grad(engine, grad))
    with compat.running_engine_backward(engine), compat.split_backward_loss(engine, output.sum()) as loss:
        loss.backward()
    scale = 1024.0 if compat.backward_in_pieces() else 1.0
    torch.testing.assert_close(x.grad, torch.full((3,), 3.0 * scale / steps), rtol=1e-7, atol=0)
