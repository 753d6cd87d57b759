"""``train-reference`` and ``export`` command bodies, for the CLI in ``worker/cli/main.py``.

Importing this module is cheap and does not import TensorFlow: the parser
helpers only add arguments, and TensorFlow is loaded when a command runs.
The commands take already-parsed arguments (the CLI applies environment
variables) and return an exit code; errors are raised as ``MMStreamError``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.contract.errors import ConfigError
from worker.contract.manifest import MODEL_FILE

DEFAULT_REFERENCE_DIR = ".cache/reference-model"
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4


def add_train_reference_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``train-reference``: out, image_size, epochs, n_train, seed."""
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_REFERENCE_DIR),
        help="directory for model.keras and mmstream-spec.json (default: %(default)s)",
    )
    parser.add_argument(
        "--image-size",
        dest="image_size",
        type=int,
        default=64,
        help="square image input size in pixels, e.g. 64 or 256 (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int, default=10, help="training epochs (default: %(default)s)"
    )
    parser.add_argument(
        "--n-train",
        dest="n_train",
        type=int,
        default=4000,
        help="number of generated training samples (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of data and weights (default: %(default)s)"
    )


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``export``: model, out, spec, opset, tolerance, version, fp16."""
    parser.add_argument(
        "--model",
        type=Path,
        default=Path(DEFAULT_REFERENCE_DIR),
        help="the model: a .keras file (converted with tf2onnx, parity-checked), an .onnx "
        "file from any framework (imported as it is, smoke-checked), or a directory holding "
        "model.keras or model.onnx (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="model directory to write (model.onnx, manifest.json); required; a previous "
        "export there is replaced",
    )
    parser.add_argument(
        "--spec",
        type=Path,
        default=None,
        help="the spec sidecar: parts, their transforms and the model inputs they fill, "
        "constants, outputs, labels, model card (default: mmstream-spec.json beside the "
        "model; docs/byom.md)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help="ONNX opset of a Keras conversion, at most 18 (default: %(default)s; an "
        ".onnx model keeps its own)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest allowed abs difference: Keras vs ONNX Runtime, or for an .onnx "
        "model batched vs one-at-a-time runs (default: %(default)s)",
    )
    parser.add_argument(
        "--version",
        default=None,
        help="model version for the manifest (default: the sidecar's)",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="serve FP16 weights and compute (inputs and outputs stay float32); refused "
        "unless its argmax agrees with the FP32 model's on >= 99.5%% of >= 1000 random "
        "valid inputs (the parity inputs and more)",
    )


def train_reference_main(args: argparse.Namespace) -> int:
    """Train the reference model into ``args.out`` and print its model card's numbers."""
    from export.reference_model import train_reference

    result = train_reference(
        args.out,
        image_size=args.image_size,
        n_train=args.n_train,
        epochs=args.epochs,
        seed=args.seed,
    )
    card = result["model_card"]
    ev, tr = card["evaluation"], card["training"]
    acc, clean = ev["accuracy"], ev["clean_accuracy"]
    print(f"reference model written to {result['out_dir']}")
    print(
        f"  trained {tr['epochs']} epochs on {tr['n_train']} samples "
        f"(corrupt_p {tr['corrupt_p']}, seed {tr['seed']}) in {tr['seconds']} s"
    )
    print(
        f"  held-out accuracy (n={ev['n']}, corrupt_p {ev['corrupt_p']}): fused {acc['fused']:.4f}"
        f"  image {acc['image_only']:.4f}  text {acc['text_only']:.4f}"
        f"  audio {acc['audio_only']:.4f}"
    )
    print(f"  clean test accuracy: fused {clean['fused']:.4f}")
    failed = [name for name, ok in ev["checks"].items() if not ok]
    if failed:
        print(f"  WARNING: quality checks failed: {', '.join(failed)}")
    return 0


def _onnx_source(model: Path) -> bool:
    """Whether ``--model`` names an ONNX graph (a .onnx file, or a directory with
    model.onnx and no model.keras)."""
    from export import KERAS_FILE

    if model.suffix == ".onnx":
        return True
    return model.is_dir() and (model / MODEL_FILE).is_file() and not (model / KERAS_FILE).exists()


def export_main(args: argparse.Namespace) -> int:
    """Export ``args.model`` to ``args.out`` and print the check's numbers."""
    import time

    if args.out is None:
        raise ConfigError("export needs an output directory: --out DIR")
    started = time.perf_counter()
    if _onnx_source(args.model):
        from export.onnx_import import import_onnx

        if args.fp16:
            raise ConfigError("--fp16 converts a Keras export; an .onnx model is served as it is")
        manifest = import_onnx(
            args.model,
            args.out,
            spec_path=args.spec,
            tolerance=args.tolerance,
            version=args.version,
        )
    else:
        from export.convert import export_model

        manifest = export_model(
            args.model,
            args.out,
            spec_path=args.spec,
            opset=args.opset,
            tolerance=args.tolerance,
            version=args.version,
            fp16=args.fp16,
        )
    parity = manifest.parity
    print(f"exported {manifest.name} {manifest.version} to {Path(args.out)}")
    print(
        f"  opset {manifest.opset}, sha256 {manifest.sha256[:12]}..., "
        f"{time.perf_counter() - started:.1f} s"
    )
    print(
        f"  parity ({parity.get('reference', 'keras')}): max abs diff "
        f"{parity['max_abs_diff']:.3g} (tolerance {parity['tolerance']:.3g}), batch sizes "
        f"{parity['batch_sizes']}"
        + (
            f", argmax agreement {parity['argmax_agreement']:.4f}"
            if "argmax_agreement" in parity
            else ""
        )
    )
    if manifest.fp16_parity:
        fp16 = manifest.fp16_parity
        size = (Path(args.out) / MODEL_FILE).stat().st_size
        print(
            f"  fp16 vs fp32 ONNX Runtime on {fp16['rows']} examples: argmax agreement "
            f"{fp16['argmax_agreement']:.4f} "
            f"(min {fp16['min_agreement']:.4f}), max abs diff {fp16['max_abs_diff']:.3g}; "
            f"{MODEL_FILE} {size / 1024:.0f} KiB"
        )
    for part in manifest.parts:
        fills = ", ".join(f"{i.name} {i.dtype}{list(i.shape)}" for i, _ in part.fills)
        print(f"  part {part.name} ({part.transform.kind}) -> {fills}")
    for const in manifest.constants:
        print(f"  constant {const.input.name} = {const.value!r}")
    return 0
