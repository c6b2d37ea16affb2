"""Output folders are never destroyed: calibrate.py --out, gptq.py --out (and its .partial/), --fake-quant and
train_tiny.py refuse to replace a folder that is not a previous output of the same kind, unless --overwrite;
the model and calib folders are never written into or replaced, not even with --overwrite."""

import os
import shutil

import pytest

import calibrate
import gptq
import model
from quant import folders
from tools import train_tiny

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "tiny-qwen3-vl-moe")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A copy of the bundled tiny Qwen (the tests try to destroy it, so never the bundled folder itself)."""
    dst = tmp_path_factory.mktemp("model") / "tiny"
    shutil.copytree(BUNDLED, dst)
    return str(dst)


@pytest.fixture(scope="module")
def calib(ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("calib") / "calib")
    calibrate.main(["--model", ckpt, "--n", "2", "--no-gamma", "--out", out])
    return out


def snapshot(folder):
    """name -> bytes of every file below `folder` (to show it is untouched)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def user_folder(path):
    os.makedirs(path)
    with open(os.path.join(path, "thesis.tex"), "w") as f:
        f.write("three years of work")
    return str(path)


def quantize(ckpt, calib, out, *extra):
    return gptq.main(["--model", ckpt, "--calib", calib, "--out", str(out), "--method", "rtn", "--bits", "4",
                      "--group-size", "32", "--no-eval", *extra])


def test_gptq_refuses_the_model_folder_and_folders_inside_or_above_it(ckpt, calib):
    before = snapshot(ckpt)
    for out in (ckpt, os.path.join(ckpt, "quantized"), os.path.dirname(ckpt)):
        for extra in ((), ("--overwrite",)):
            with pytest.raises(folders.OutputError, match="input folder"):
                quantize(ckpt, calib, out, *extra)
    with pytest.raises(folders.OutputError, match="input folder"):
        quantize(ckpt, calib, calib, "--overwrite")
    assert snapshot(ckpt) == before


def test_gptq_refuses_the_working_directory(ckpt, calib, tmp_path, monkeypatch):
    work = user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    for extra in ((), ("--overwrite",)):
        with pytest.raises(folders.OutputError, match="working directory"):
            quantize(ckpt, calib, ".", *extra)
    assert snapshot(work) == {"thesis.tex": b"three years of work"}


def test_gptq_replaces_a_user_folder_only_with_overwrite(ckpt, calib, tmp_path):
    out = user_folder(tmp_path / "mine")
    with pytest.raises(folders.OutputError, match="--overwrite"):
        quantize(ckpt, calib, out)
    assert snapshot(out) == {"thesis.tex": b"three years of work"}
    partial = user_folder(tmp_path / "q.partial")  # OUT.partial/ is a folder we would delete as well
    with pytest.raises(folders.OutputError, match="partial"):
        quantize(ckpt, calib, tmp_path / "q")
    assert snapshot(partial) == {"thesis.tex": b"three years of work"}
    quantize(ckpt, calib, out, "--overwrite")
    assert "thesis.tex" not in os.listdir(out) and folders.output_kind(out) == "quantized"
    model.load_model(out)  # the marker does not disturb loading


def test_gptq_replaces_its_own_previous_output_and_an_empty_folder(ckpt, calib, tmp_path):
    os.makedirs(tmp_path / "q")
    quantize(ckpt, calib, tmp_path / "q")
    first = snapshot(tmp_path / "q")
    quantize(ckpt, calib, tmp_path / "q", "--fake-quant")
    assert not os.path.exists(tmp_path / "q.partial")
    assert folders.output_kind(str(tmp_path / "q" / "fake-quant")) == "fake-quant"
    again = {k: v for k, v in snapshot(tmp_path / "q").items() if not k.startswith("fake-quant")}
    assert {k for k in again} == {k for k in first}
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []  # no temporary folders left
    with pytest.raises(folders.OutputError, match="a quantized folder"):  # a gptq output is not a calib/
        calibrate.main(["--model", ckpt, "--n", "2", "--no-gamma", "--out", str(tmp_path / "q")])


def test_fake_quant_refuses_a_user_folder(ckpt, calib, tmp_path):
    quantize(ckpt, calib, tmp_path / "q")
    dst = user_folder(tmp_path / "fq")
    with pytest.raises(folders.OutputError, match="--overwrite"):
        folders.export_fake_quant(str(tmp_path / "q"), dst)
    assert snapshot(dst) == {"thesis.tex": b"three years of work"}
    for bad in (tmp_path / "q", tmp_path):
        with pytest.raises(folders.OutputError, match="would replace the folder .* it reads"):
            folders.export_fake_quant(str(tmp_path / "q"), str(bad), overwrite=True)
    folders.export_fake_quant(str(tmp_path / "q"), dst, overwrite=True)
    assert folders.output_kind(dst) == "fake-quant" and "thesis.tex" not in os.listdir(dst)


def test_calibrate_refuses_user_model_and_data_folders(ckpt, calib, tmp_path):
    before = snapshot(ckpt)
    for extra in ((), ("--overwrite",)):
        with pytest.raises(folders.OutputError, match="input folder"):
            calibrate.main(["--model", ckpt, "--n", "2", "--out", ckpt, *extra])
    assert snapshot(ckpt) == before
    out = user_folder(tmp_path / "mine")
    with pytest.raises(folders.OutputError, match="--overwrite"):
        calibrate.main(["--model", ckpt, "--n", "2", "--out", out])
    assert snapshot(out) == {"thesis.tex": b"three years of work"}
    first = snapshot(calib)
    calibrate.main(["--model", ckpt, "--n", "2", "--no-gamma", "--out", calib])  # a previous calib/: replaced
    assert snapshot(calib).keys() == first.keys()


def test_train_tiny_refuses_a_folder_that_is_not_a_tiny_model(tmp_path):

    out = user_folder(tmp_path / "mine")
    with pytest.raises(folders.OutputError, match="--overwrite"):
        train_tiny.train("qwen3_vl_moe", out, steps=1)
    assert snapshot(out) == {"thesis.tex": b"three years of work"}
    assert folders.output_kind(BUNDLED) == "tiny-model"  # retraining the bundled models replaces them
