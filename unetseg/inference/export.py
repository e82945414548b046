"""Export a checkpoint's net: ``python -m unetseg.inference.export --ckpt X --format onnx|torchscript
[--check]``.

The exported graph is the net alone: a normalized image ``(N, C, *spatial)`` float32 in, logits
``(N, K, *spatial)`` out, for any batch and spatial size (the UNet pads to a multiple of ``2 ** depth`` and
crops back inside the graph). A deep-supervised net is exported without its deep-supervision heads
(:func:`~unetseg.inference.checkpoint.inference_net`): the full-resolution logits only, as in eval mode.
Normalization, sliding windows and argmax stay outside; the class names, input channels, spatial dims and
normalization are stored with the model (ONNX ``metadata_props``, TorchScript extra file ``unetseg.json``).

* ``torchscript``: ``torch.jit.script`` (control flow kept; ``--method auto``, the default, falls back to
  ``torch.jit.trace`` with a warning when the net cannot be scripted), saved with ``torch.jit.save``; load
  with ``torch.jit.load``.
* ``onnx``: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset 17) with dynamic
  batch and spatial axes (``torch.export`` with dynamic shapes fails on the padding's modulo); run with
  onnxruntime (``pip install unetseg[export]``). ``--static`` fixes the shape to the example's.

``--check`` runs the exported file on a random input of another size than the example (onnxruntime or
``torch.jit.load``) and compares it with PyTorch: the max abs difference is printed, exit status 1 above
``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unetseg.inference.checkpoint import CheckpointModel, inference_net

FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt"}
METADATA_KEY = "unetseg.json"


TORCHSCRIPT_METHODS: tuple[str, ...] = ("auto", "script", "trace")


def export_torchscript(
    net: nn.Module,
    path: str | Path,
    example: Tensor | None = None,
    method: str = "auto",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``net`` (eval mode, without deep-supervision heads) as TorchScript with ``metadata`` as the extra
    file ``unetseg.json``.

    ``method``: ``"script"`` (``torch.jit.script``, control flow kept), ``"trace"`` (``torch.jit.trace`` on
    ``example``; shape arithmetic is recorded, so other sizes work, but data-dependent branches are frozen)
    or ``"auto"``: script, and trace with a warning naming the scripting error if the net cannot be scripted.
    """
    if method not in TORCHSCRIPT_METHODS:
        raise ValueError(f"method={method!r} is not one of {list(TORCHSCRIPT_METHODS)}")
    path = Path(path)
    net = inference_net(net)
    scripted = None
    if method in ("auto", "script"):
        try:
            scripted = torch.jit.script(net)
        except Exception as err:  # TorchScript rejects many Python constructs
            message = f"{type(net).__name__} cannot be exported with torch.jit.script: {err}"
            if method == "script" or example is None:
                raise ValueError(message + " (use method 'trace' with an example input)") from err
            warnings.warn(message + "; exporting with torch.jit.trace instead", stacklevel=2)
    if scripted is None:
        if example is None:
            raise ValueError("method 'trace' needs an example input")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            scripted = torch.jit.trace(net, example)
    torch.jit.save(scripted, str(path), _extra_files={METADATA_KEY: json.dumps(metadata or {})})
    return path


def export_onnx(
    net: nn.Module,
    path: str | Path,
    example: Tensor,
    dynamic: bool = True,
    opset: int = 17,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Export ``net`` (eval mode, without deep-supervision heads) to ONNX, traced on ``example``
    ``(N, C, *spatial)``; batch and spatial axes are dynamic unless ``dynamic=False``. ``metadata`` goes into
    ``metadata_props`` (key ``unetseg.json``)."""
    path = Path(path)
    axes = {0: "batch", **{i: f"spatial_{i - 2}" for i in range(2, example.ndim)}}
    with warnings.catch_warnings():  # shape arithmetic recorded as graph ops is what we want
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            inference_net(net),
            (example,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes} if dynamic else None,
            opset_version=opset,
        )
    if metadata:
        import onnx

        model = onnx.load(str(path))
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        onnx.save(model, str(path))
    return path


def run_exported(path: str | Path, image: Tensor) -> np.ndarray:
    """Output of an exported model (``.onnx`` via onnxruntime on CPU, else ``torch.jit.load``)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"image": image.detach().cpu().numpy()})[0]
    module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(image.detach().cpu()).numpy()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``unetseg.json`` metadata stored with an exported model."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props.get(METADATA_KEY, "{}"))
    files = {METADATA_KEY: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[METADATA_KEY] or "{}")


def max_abs_difference(net: nn.Module, path: str | Path, image: Tensor) -> float:
    """``max |exported(image) - net(image)|`` on CPU."""
    with torch.no_grad():
        reference = net.eval().cpu()(image.cpu()).numpy()
    exported = run_exported(path, image)
    if exported.shape != reference.shape:
        raise ValueError(f"{path}: output shape {exported.shape} differs from PyTorch's {reference.shape}")
    return float(np.abs(exported - reference).max())


def export_checkpoint(
    ckpt: str | Path,
    fmt: str,
    output: str | Path | None = None,
    example_size: Sequence[int] | None = None,
    dynamic: bool = True,
    opset: int = 17,
    method: str = "auto",
) -> tuple[Path, nn.Module, Tensor]:
    """Export the net of ``ckpt``; returns ``(path, net, example)``. The default example size is 2x the net's
    ``size_multiple`` per axis (at least 32)."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not one of {sorted(FORMATS)}")
    model = CheckpointModel.load(ckpt)
    net = model.net.cpu().eval()
    spatial_dims, in_channels = model.spatial_dims, model.in_channels
    if example_size is None:
        example_size = [max(32, 2 * int(getattr(net, "size_multiple", 16)))] * spatial_dims
    if len(example_size) != spatial_dims:
        raise ValueError(
            f"example size {list(example_size)} must have {spatial_dims} values (the net is {spatial_dims}D)"
        )
    example = torch.randn(1, in_channels, *example_size, generator=torch.Generator().manual_seed(0))
    metadata = {
        "class_names": list(model.class_names),
        "in_channels": in_channels,
        "spatial_dims": spatial_dims,
        "net": model.hparams.get("net"),
        "preprocessing": model.preprocessing,
        "input": "image (N, C, *spatial) float32, normalized as in preprocessing",
        "output": "logits (N, num_classes, *spatial)",
    }
    path = Path(output) if output is not None else Path(ckpt).with_suffix(FORMATS[fmt])
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        export_onnx(net, path, example, dynamic=dynamic, opset=opset, metadata=metadata)
    else:
        export_torchscript(net, path, example, method, metadata)
    return path, net, example


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unetseg.inference.export",
        description="Export a unetseg checkpoint's net to ONNX or TorchScript.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint (.ckpt) written by train.py")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="onnx or torchscript")
    parser.add_argument("--output", help="output file (default: the checkpoint's path with .onnx / .pt)")
    parser.add_argument("--example-size", type=int, nargs="+", help="spatial size of the tracing example")
    parser.add_argument("--static", action="store_true", help="ONNX: fixed input shape (the example's)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument(
        "--method", choices=TORCHSCRIPT_METHODS, default="auto", help="TorchScript: script, trace or auto"
    )
    parser.add_argument("--check", action="store_true", help="compare the exported model with PyTorch")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="--check: max abs difference allowed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 parity check failed, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        path, net, example = export_checkpoint(
            args.ckpt, args.format, args.output, args.example_size, not args.static, args.opset, args.method
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"unetseg.inference.export: error: {err}", file=sys.stderr)
        return 2
    print(f"unetseg.inference.export: wrote {path}")
    if args.check:
        shape = list(example.shape)
        if not args.static:  # another batch and spatial size than the example: the axes are dynamic
            shape = [2, shape[1], *(s + 3 for s in shape[2:])]
        image = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        diff = max_abs_difference(net, path, image)
        print(f"unetseg.inference.export: max abs difference vs PyTorch on input {tuple(shape)}: {diff:.3g}")
        if not diff <= args.tolerance:
            print(
                f"unetseg.inference.export: error: difference above --tolerance {args.tolerance}",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
