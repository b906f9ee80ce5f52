"""``loralab cache``: encode a dataset's images with a checkpoint's VAE ahead of training.

The latents go into the shared, content-addressed cache (see :mod:`loralab.data.latent_cache`),
so every later run (and every run of a sweep) with the same images, crops and VAE skips the
encoding. Prints a progress bar on stderr and ``N cached, M encoded`` on stdout; a second run
over the same data prints ``N cached, 0 encoded``.

Which crops are cached follows the training config (resolution, bucket settings, flip_aug,
regularisation folder, and the VAE dtype from mixed_precision / no_half_vae), so pass the
config you will train with; without one, loralab's defaults apply.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from loralab.cli.options import add_override_option, resolve_device


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="encode a dataset's images into the shared latent cache ahead of training",
        description=(
            "Encode every training (and regularisation) image of DATASET, as training will crop "
            "it, with the VAE of CHECKPOINT (or --vae), into the shared latent cache. Images "
            "already cached with the same content, crop and VAE are skipped."
        ),
    )
    parser.add_argument(
        "dataset",
        type=Path,
        metavar="DATASET",
        help="folder of 'N_token class' folders, or a 'loralab prepare' output (its img/ and reg/ are used)",
    )
    parser.add_argument("--checkpoint", type=Path, help="base checkpoint (default: the config's pretrained_model_name_or_path)")
    parser.add_argument("--vae", type=Path, help="VAE file or folder to use instead of the checkpoint's (default: the config's vae)")
    parser.add_argument("--config", type=Path, help="training config whose resolution, buckets and flip_aug decide the crops")
    parser.add_argument("--resolution", help="training resolution, e.g. 768 or 768,512 (replaces the config's)")
    parser.add_argument("--reg-data", type=Path, help="regularisation images folder (replaces reg_data_dir)")
    add_override_option(parser)
    parser.add_argument("--cache-dir", type=Path, help="cache folder (default: $LORALAB_CACHE_DIR or the user cache folder)")
    parser.add_argument("--vae-batch-size", type=int, default=4, help="images per VAE call (default 4)")
    parser.add_argument("--device", help="device to encode on (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `loralab --help` does not pay for torch and diffusers.
    from loralab.data.dataset import TrainingDataset
    from loralab.data.latent_cache import LatentCache
    from loralab.errors import ConfigError

    config = _config(args)
    train_dir, reg_dir = _dataset_folders(args.dataset, args.reg_data)
    dataset = TrainingDataset.from_config(config, train_dir=train_dir, reg_dir=reg_dir)
    if not dataset.options.latent_cacheable:
        raise ConfigError("color_aug and random_crop change the image every epoch, so latents cannot be cached; unset them")
    if args.vae_batch_size < 1:
        raise ConfigError(f"--vae-batch-size {args.vae_batch_size} must be at least 1")

    device = resolve_device(args.device)
    vae, vae_source = _load_vae(config, args, device)
    cache = LatentCache.for_vae(vae, source=vae_source, root=args.cache_dir)
    print(f"latent cache: {cache.root} (VAE {cache.vae_id[:12]}, {cache.dtype})", file=sys.stderr)
    stats = cache.fill(vae, dataset.latent_requests(), batch_size=args.vae_batch_size, progress=True)
    print(f"{stats.cached} cached, {stats.encoded} encoded")
    return 0


def _config(args: argparse.Namespace) -> Any:
    from loralab.config.loading import apply_overrides, load_config
    from loralab.config.schema import TrainConfig, parse_resolution
    from loralab.errors import ConfigError

    overrides = list(args.overrides)
    if args.resolution:
        try:
            width, height = parse_resolution(args.resolution)
        except ConfigError as exc:
            raise ConfigError(f"--resolution: {exc}") from None
        if width <= 0 or height <= 0:
            raise ConfigError(f"--resolution {args.resolution} must be positive, e.g. 768 or 768,512")
        overrides.append(f"resolution=[{width}, {height}]")
    if args.config is not None:
        return load_config(args.config, overrides)
    return apply_overrides(TrainConfig(), overrides)


def _dataset_folders(dataset: Path, reg_data: Path | None) -> tuple[Path, Path | None]:
    """DATASET itself, or the img/ (and reg/) of a ``loralab prepare`` output folder."""
    from loralab.data.discovery import parse_folder_name

    prepared = (dataset / "img").is_dir() and not any(
        p.is_dir() and parse_folder_name(p.name) for p in dataset.iterdir()
    )
    if not prepared:
        return dataset, reg_data
    if reg_data is None and (dataset / "reg").is_dir():
        reg_data = dataset / "reg"
    return dataset / "img", reg_data


def _load_vae(config: Any, args: argparse.Namespace, device: str) -> tuple[Any, Path]:
    """Only the VAE: from ``--vae`` / the config's ``vae``, else from the checkpoint."""
    from loralab.data.latent_cache import vae_dtype_for
    from loralab.errors import CheckpointError
    from loralab.models.loading import inspect_checkpoint, load_vae

    checkpoint = args.checkpoint or config.pretrained_model_name_or_path
    if checkpoint is None:
        raise CheckpointError("no checkpoint: pass --checkpoint FILE or set pretrained_model_name_or_path in --config")
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    info = inspect_checkpoint(checkpoint)
    vae_path = args.vae or (Path(config.vae) if config.vae else None)
    if vae_path is None and info.vae_config is None:
        raise CheckpointError(f"{checkpoint} has no VAE weights; pass a VAE with --vae")
    source = vae_path or checkpoint
    vae = load_vae(source, info.family, dtype=vae_dtype_for(config), device=device)
    return vae.eval(), source
