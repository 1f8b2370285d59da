"""Stage 1: every official fixture loads safely and rebuilds into our own modules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.checkpoint import load_checkpoint
from exporter.model import build_model
from exporter import heads, modules
from tests.conftest import OFFICIAL, OFFICIAL_NAMES, TRAINED, official_reference


@pytest.mark.parametrize("name", OFFICIAL_NAMES)
def test_fixture_loads_with_official_metadata(name):
    ckpt = load_checkpoint(OFFICIAL / f"{name}.pt")
    meta = official_reference(name)["meta"]
    assert ckpt.nc == meta["model"]["nc"]
    assert ckpt.names == meta["model"]["names"]
    assert ckpt.stride == meta["model"]["stride"]
    # anchors come from the pickled Detect module (autoanchor may have changed them), never the yaml
    np.testing.assert_allclose(np.array(ckpt.anchors_px), np.array(meta["model"]["anchor_grid_px"]), rtol=0, atol=1e-4)
    assert all(t.dtype != torch.float16 for t in ckpt.state_dict.values()), "fp16 must become fp32"
    assert ckpt.head_type == meta["model"]["detect_class"].rsplit(".", 1)[-1]


def test_autoanchor_fixture_uses_pickled_anchors_not_yaml():
    name = next(n for n in OFFICIAL_NAMES if official_reference(n)["meta"]["spec"].get("autoanchor"))
    ckpt = load_checkpoint(OFFICIAL / f"{name}.pt")
    yaml_anchors = np.array(ckpt.yaml["anchors"], dtype=np.float32).reshape(len(ckpt.stride), -1, 2)
    assert not np.allclose(np.array(ckpt.anchors_px), yaml_anchors), "fixture should have modified anchors"
    model = build_model(ckpt)
    np.testing.assert_allclose(model.head.anchor_grid.view(len(ckpt.stride), -1, 2).numpy(), np.array(ckpt.anchors_px))


@pytest.mark.parametrize("name", OFFICIAL_NAMES)
def test_rebuilt_model_matches_official_unfused_output(name):
    ref = official_reference(name)
    model = build_model(load_checkpoint(OFFICIAL / f"{name}.pt"))
    with torch.no_grad():
        out = model(torch.from_numpy(ref["input"])).numpy()
    assert out.shape == ref["out"].shape
    np.testing.assert_allclose(out[..., :4], ref["out"][..., :4], atol=0.05, rtol=0)
    np.testing.assert_allclose(out[..., 4:], ref["out"][..., 4:], atol=1e-3, rtol=0)


def test_numpy1_and_numpy2_pickles_both_load():
    kinds = {official_reference(n)["meta"]["spec"].get("np_legacy") for n in OFFICIAL_NAMES}
    assert kinds >= {True, False}, "fixtures should cover both numpy pickle layouts"
    for name in OFFICIAL_NAMES:
        load_checkpoint(OFFICIAL / f"{name}.pt")


def test_gpu_saved_legacy_checkpoint_loads_on_cpu():
    import zipfile

    legacy = [n for n in OFFICIAL_NAMES if n.endswith("_deploy")]
    assert legacy
    for name in legacy:
        path = OFFICIAL / f"{name}.pt"
        with zipfile.ZipFile(path) as z:
            pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        ckpt = load_checkpoint(path)
        assert all(t.device.type == "cpu" for t in ckpt.state_dict.values())
        if b"cuda" in pkl:
            return
    pytest.fail("no fixture with storages tagged cuda:0 found")


def test_trained_checkpoint_builds_our_modules_only():
    model = build_model(load_checkpoint(TRAINED))
    assert isinstance(model.head, heads.IDetect)
    own = (modules.Conv, modules.MP, modules.SP, modules.Concat, heads.IDetect, torch.nn.Upsample)
    assert all(isinstance(layer, own) for layer in model.model)
    assert model.names == ["circle", "square", "triangle", "star", "cross"]
    assert isinstance(model.model[0].act, torch.nn.LeakyReLU) and model.model[0].act.negative_slope == 0.1


def test_checkpoint_saved_in_fused_layout_loads():
    """Deploy checkpoints may hold already-fused blocks (conv with bias and no BN; RepConv.rbr_reparam)."""
    import copy as _copy

    from exporter.fuse import fuse_model

    name = "dev_yolov7_w0125_nc80"  # has RepConv
    ckpt = load_checkpoint(OFFICIAL / f"{name}.pt")
    fused = build_model(ckpt)
    fuse_model(fused)
    deploy = _copy.copy(ckpt)
    deploy.state_dict = {k: v.clone() for k, v in fused.state_dict().items()}
    deploy.yaml = _copy.deepcopy(ckpt.yaml)
    deploy.yaml["head"][-1][2] = "Detect"
    deploy.head_type = "Detect"
    assert any(k.endswith("rbr_reparam.weight") for k in deploy.state_dict)
    rebuilt = build_model(deploy)
    ref = official_reference(name)
    x = torch.from_numpy(ref["input"])
    with torch.no_grad():
        out = rebuilt(x).numpy()
    np.testing.assert_allclose(out[..., :4], ref["out_fused"][..., :4], atol=0.05, rtol=0)
    np.testing.assert_allclose(out[..., 4:], ref["out_fused"][..., 4:], atol=1e-3, rtol=0)
