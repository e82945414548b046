"""ONNX and TorchScript export: parity with PyTorch for every skip mode, 2D and 3D, at other input sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unetseg import UNet
from unetseg.inference.export import (
    export_onnx,
    export_torchscript,
    max_abs_difference,
    read_metadata,
    run_exported,
)
from unetseg.inference.export import (
    main as export_main,
)
from unetseg.training.cli import main

pytest.importorskip("onnxruntime")

TOLERANCE = 1e-4  # float32 kernels differ in summation order; observed differences are ~1e-7


def _net(spatial_dims: int, long_skip: str) -> UNet:
    torch.manual_seed(0)
    net = UNet(
        spatial_dims=spatial_dims, in_channels=2, out_channels=3, channels=(4, 8, 16), long_skip=long_skip
    )
    with torch.no_grad():  # non-trivial BatchNorm running statistics, so eval mode matters
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net.eval()


SIZES = {2: ([20, 24], [2, 2, 13, 18]), 3: ([12, 8, 12], [2, 2, 9, 13, 6])}  # example, then another size


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("long_skip", ["concat", "add", "none"])
def test_exported_model_matches_pytorch_at_another_batch_and_spatial_size(
    tmp_path, fmt, spatial_dims, long_skip
):
    net = _net(spatial_dims, long_skip)
    example_size, other_shape = SIZES[spatial_dims]
    example = torch.randn(1, 2, *example_size)
    path = tmp_path / f"net.{fmt}"
    if fmt == "onnx":
        export_onnx(net, path, example, metadata={"class_names": ["a", "b", "c"]})
    else:
        export_torchscript(net, path, example, metadata={"class_names": ["a", "b", "c"]})
    image = torch.randn(*other_shape, generator=torch.Generator().manual_seed(1))
    diff = max_abs_difference(net, path, image)
    print(f"{fmt} {spatial_dims}D {long_skip}: max abs difference {diff:.2e}")
    assert diff < TOLERANCE
    assert run_exported(path, image).shape == (other_shape[0], 3, *other_shape[2:])
    assert read_metadata(path) == {"class_names": ["a", "b", "c"]}


def test_parity_check_would_catch_a_different_model(tmp_path):
    net, other = _net(2, "concat"), _net(2, "add")
    export_onnx(net, tmp_path / "net.onnx", torch.randn(1, 2, 16, 16))
    assert max_abs_difference(other, tmp_path / "net.onnx", torch.randn(1, 2, 16, 16)) > 1e-2


def test_static_onnx_export_rejects_other_shapes(tmp_path):
    net = _net(2, "concat")
    export_onnx(net, tmp_path / "static.onnx", torch.randn(1, 2, 16, 16), dynamic=False)
    assert max_abs_difference(net, tmp_path / "static.onnx", torch.randn(1, 2, 16, 16)) < TOLERANCE
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        run_exported(tmp_path / "static.onnx", torch.randn(1, 2, 24, 16))


def test_unet_can_be_scripted_not_only_traced(tmp_path):
    # torch.jit.script keeps control flow; `--method auto` falls back to tracing only when this fails.
    for spatial_dims in (2, 3):
        path = export_torchscript(
            _net(spatial_dims, "concat"), tmp_path / f"s{spatial_dims}.pt", method="script"
        )
        image = torch.randn(1, 2, *([11] * spatial_dims))
        assert max_abs_difference(_net(spatial_dims, "concat"), path, image) < TOLERANCE


def test_torchscript_method_is_checked():
    with pytest.raises(ValueError, match=r"method='jit' is not one of \['auto', 'script', 'trace'\]"):
        export_torchscript(_net(2, "add"), "x.pt", method="jit")


def test_cli_exports_a_3d_checkpoint_with_its_metadata(tmp_path, run_args, capsys):
    result = main(
        [
            "--config",
            "debug",
            *run_args,
            "--test",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--data.spatial_dims",
            "3",
            "--data.spatial_size",
            "16",
            "--model.net.init_args.long_skip",
            "add",
        ]
    )
    ckpt = result.best_model_path
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".pt")):
        output = tmp_path / f"model{suffix}"
        assert export_main(["--ckpt", ckpt, "--format", fmt, "--output", str(output), "--check"]) == 0
        out = capsys.readouterr().out
        diff = float(out.split("max abs difference vs PyTorch on input (2, 1, 35, 35, 35): ")[1].split()[0])
        assert diff < TOLERANCE
        meta = read_metadata(output)
        assert meta["class_names"] == result.datamodule.class_names and meta["spatial_dims"] == 3
        assert meta["net"]["init_args"]["long_skip"] == "add"
        assert meta["preprocessing"]["normalization"] == "zscore"  # synthetic data: z-scored per image
        json.dumps(meta)
    assert export_main(["--ckpt", str(tmp_path / "missing.ckpt"), "--format", "onnx"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    image = np.zeros((1, 1, 8, 8, 8), np.float32)
    assert run_exported(tmp_path / "model.onnx", torch.from_numpy(image)).shape == (1, 4, 8, 8, 8)
