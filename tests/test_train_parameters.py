"""Each of the guide's 21 compared parameters takes effect inside a real training run.

Every test trains the tiny SD1.5 model for a few steps through ``train()`` and observes the
parameter where the run uses it: the optimizer the run built, the tensors its loop computed
(``LoopHooks.on_batch``), what the UNet was fed (module hooks attached in ``on_start``), the
TensorBoard log, the manifest or the LoRA file. The building blocks' formulas are tested on
their own in ``test_train_blocks.py``; here the question is only whether the run uses them.
"""

from __future__ import annotations

import json
import math
import tempfile
from itertools import pairwise
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from loralab.models.loading import load_checkpoint
from loralab.models.tiny import make_tiny
from loralab.network.lora_file import read_lora_file
from loralab.plan.planner import make_plan
from loralab.train.conditioning import encode_text, tokenize_captions
from loralab.train.loop import BatchReport, LoopHooks, TrainingSession
from loralab.train.manifest import legacy_model_hash
from loralab.train.run import RunResult, train
from train_support import CAPTION, lora_tensors, make_dataset, max_tensor_difference, series, tiny_config


# ---------------------------------------------------------------------------------------------
# What a run did, seen from inside it


@dataclass
class Observed:
    """Everything the hooks saw during one run."""

    session: TrainingSession | None = None
    batches: list[BatchReport] = field(default_factory=list)
    unet_inputs: list[torch.Size] = field(default_factory=list)  # noisy latents' shapes
    conditioning: list[torch.Tensor] = field(default_factory=list)  # encoder_hidden_states
    compute_dtypes: set[torch.dtype] = field(default_factory=set)  # outputs of the UNet's first conv
    threads_in_step: list[int] = field(default_factory=list)
    optimizer_groups: list[dict[str, Any]] = field(default_factory=list)

    def hooks(self) -> LoopHooks:
        def on_start(session: TrainingSession) -> None:
            self.session = session
            self.optimizer_groups = [
                {k: v for k, v in g.items() if k != "params"} for g in session.optimizer.param_groups
            ]
            unet = session.components.unet

            def before_unet(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                self.unet_inputs.append(args[0].shape)
                self.conditioning.append(kwargs["encoder_hidden_states"].detach().float().clone())

            unet.register_forward_pre_hook(before_unet, with_kwargs=True)
            unet.conv_in.register_forward_hook(lambda _m, _i, out: self.compute_dtypes.add(out.dtype))

        def on_batch(report: BatchReport) -> None:
            self.batches.append(report)
            self.threads_in_step.append(torch.get_num_threads())

        return LoopHooks(on_start=on_start, on_batch=on_batch)

    def samples_per_epoch(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for report in self.batches:
            counts[report.epoch] = counts.get(report.epoch, 0) + len(report.timesteps)
        return counts


@dataclass
class Run:
    result: RunResult
    seen: Observed
    config: Any

    @property
    def logged(self) -> dict[str, list[tuple[int, float]]]:
        return series(self.result.run_dir)

    def values(self, tag: str) -> list[float]:
        return [value for _, value in self.logged[tag]]

    def steps(self, tag: str = "lr/unet") -> list[int]:
        return [step for step, _ in self.logged[tag]]

    @property
    def lora(self) -> dict[str, torch.Tensor]:
        return lora_tensors(self.result.final_lora)

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.result.run_dir / "manifest.json").read_text())


def _write_images(folder: Path, count: int, width: int, height: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{index:03d}.png")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Two tiny checkpoints, datasets (1 and 2 repeats, wide images, regularisation images), and
    a memo of runs, so tests that need the same baseline train it once."""
    root = tmp_path_factory.mktemp("parameters")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORALAB_CACHE_DIR", str(root / "cache"))
        wide = root / "wide" / "img"
        _write_images(wide / f"1_{CAPTION}", 4, width=96, height=64)
        reg = root / "reg"
        _write_images(reg / "1_woman", 4, width=64, height=64)
        space = SimpleNamespace(
            root=root,
            checkpoint=make_tiny("sd15", "single-file", root / "tiny.safetensors"),
            other_checkpoint=make_tiny("sd15", "single-file", root / "other.safetensors", seed=1),
            single=make_dataset(root / "one_repeat", images=4, repeats=1),
            two_repeats=make_dataset(root / "two_repeats", images=4, repeats=2),
            wide=wide,
            reg=reg,
            runs={},
        )
        yield space


def run(ws: SimpleNamespace, data: str = "single", **overrides: Any) -> Run:
    """Train the tiny model on dataset ``data`` with ``overrides`` (1 step unless they say otherwise)."""
    key = (data, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
    if key not in ws.runs:
        values: dict[str, Any] = {"max_train_epochs": None, "max_train_steps": 1}
        values.update(overrides)
        config = tiny_config(ws.checkpoint, getattr(ws, data), **values)
        seen = Observed()
        run_dir = Path(tempfile.mkdtemp(prefix="run", dir=ws.root))  # unique even after a failed run
        result = train(config, run_dir=run_dir, hooks=seen.hooks(), progress="quiet")
        assert result.status == "completed"
        ws.runs[key] = Run(result, seen, config)
    return ws.runs[key]


# ---------------------------------------------------------------------------------------------
# 1-5. D-Adaptation and its optimizer arguments

DADAPT = {"optimizer_type": "DAdaptAdam", "learning_rate": 1.0, "max_train_steps": 4}


def _d_series(r: Run) -> list[float]:
    """d after each step: the logged lr/d*lr divided by the logged lr/unet."""
    return [d_lr / lr for d_lr, lr in zip(r.values("lr/d*lr"), r.values("lr/unet"), strict=True)]


def test_growth_rate_caps_the_growth_of_the_logged_d_lr(ws):
    capped = run(ws, **DADAPT, optimizer_args="growth_rate=1.02")
    free = run(ws, **DADAPT)
    assert capped.seen.optimizer_groups[0]["growth_rate"] == 1.02
    assert free.seen.optimizer_groups[0]["growth_rate"] == math.inf

    def ratios(r: Run) -> list[float]:
        # d starts at d0 = 1e-6 before the first step.
        d = [1e-6, *_d_series(r)]
        return [after / before for before, after in pairwise(d)]

    assert len(ratios(capped)) == 4
    assert all(ratio <= 1.02 + 1e-6 for ratio in ratios(capped))
    assert max(ratios(capped)) > 1.0  # it did grow, at the capped rate
    assert max(ratios(free)) > 1.02  # without the cap the same run grows d faster


# argument: (baseline optimizer_args, the run's optimizer_args in kohya's syntax, what the
# run's param groups then hold). ``decouple`` needs some weight decay to decouple.
OPTIMIZER_ARG_CASES = {
    "betas": ("", "betas=0.5,0.9", (0.5, 0.9)),
    "weight_decay": ("", "weight_decay=0.5", 0.5),
    "use_bias_correction": ("", "use_bias_correction=True", True),
    "decouple": ("weight_decay=0.5", "weight_decay=0.5 decouple=True", True),
}


@pytest.mark.parametrize("argument", list(OPTIMIZER_ARG_CASES))
def test_optimizer_args_land_in_the_run_optimizer_and_change_the_update(ws, argument):
    base_args, args, in_groups = OPTIMIZER_ARG_CASES[argument]
    base = run(ws, **{**DADAPT, "max_train_steps": 2}, optimizer_args=base_args)
    varied = run(ws, **{**DADAPT, "max_train_steps": 2}, optimizer_args=args)
    assert type(varied.seen.session.optimizer).__name__ == "DAdaptAdam"
    assert [group[argument] for group in varied.seen.optimizer_groups] == [in_groups] * 2  # text encoder, UNet
    assert all(group[argument] != in_groups for group in base.seen.optimizer_groups)
    # The update differs: the trained LoRA is not the baseline's.
    assert max_tensor_difference(base.lora, varied.lora) > 0


# ---------------------------------------------------------------------------------------------
# 6. Epochs x repeats


@pytest.mark.parametrize(("epochs", "data", "repeats"), [(1, "two_repeats", 2), (2, "single", 1)])
def test_epochs_times_repeats_set_images_per_epoch_and_steps(ws, epochs, data, repeats):
    # 4 images x 2 repeats x 1 epoch and 4 images x 1 repeat x 2 epochs: the same 4 steps of 2.
    r = run(ws, data, max_train_steps=None, max_train_epochs=epochs)
    assert r.seen.samples_per_epoch() == dict.fromkeys(range(epochs), 4 * repeats)
    assert r.steps() == [1, 2, 3, 4]
    assert r.steps("loss/epoch") == list(range(1, epochs + 1))
    assert r.manifest["plan"]["epochs"] == epochs


# ---------------------------------------------------------------------------------------------
# 7-8. Resolution and aspect-ratio buckets


@pytest.mark.parametrize("resolution", [64, 32])
def test_resolution_sets_the_latent_size_the_unet_sees(ws, resolution):
    r = run(ws, resolution=resolution)
    side = resolution // 8  # the VAE's downscale
    assert {shape[2:] for shape in r.seen.unet_inputs} == {(side, side)}
    assert r.lora  # trained and saved


@pytest.mark.parametrize("enable_bucket", [True, False])
def test_buckets_keep_the_aspect_ratio_of_wide_images(ws, enable_bucket):
    buckets = {"min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16}
    r = run(ws, "wide", enable_bucket=enable_bucket, **buckets)
    shapes = {tuple(shape[2:]) for shape in r.seen.unet_inputs}
    plan = make_plan(r.config)
    # The UNet sees the latents of the plan's buckets: wider than tall (96x64 images) with
    # buckets, the square training resolution without.
    assert shapes == {(b.resolution[1] // 8, b.resolution[0] // 8) for b in plan.buckets}
    ((height, width),) = shapes
    if enable_bucket:
        assert width > height and width * 8 * height * 8 <= 64 * 64
    else:
        assert (height, width) == (8, 8)


# ---------------------------------------------------------------------------------------------
# 9. Batch size


@pytest.mark.parametrize("batch_size", [1, 2])
def test_batch_size_sets_the_batch_dimension_and_the_step_count(ws, batch_size):
    r = run(ws, train_batch_size=batch_size, max_train_steps=None, max_train_epochs=1)
    assert {shape[0] for shape in r.seen.unet_inputs} == {batch_size}
    assert r.steps() == list(range(1, 4 // batch_size + 1))
    assert read_lora_file(r.result.final_lora).metadata["ss_batch_size_per_device"] == str(batch_size)


# ---------------------------------------------------------------------------------------------
# 10-11. Network rank and alpha


@pytest.mark.parametrize("dim", [2, 8])
def test_network_dim_sets_the_rank_of_every_lora_tensor(ws, dim):
    tensors = run(ws, network_dim=dim, network_alpha=dim).lora
    downs = [t for k, t in tensors.items() if k.endswith("lora_down.weight")]
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert downs and {t.shape[0] for t in downs} == {dim}
    assert {t.shape[1] for t in ups} == {dim}


def test_network_alpha_is_stored_and_scales_the_lora(ws):
    runs = {alpha: run(ws, network_dim=4, network_alpha=alpha, max_train_steps=2) for alpha in (1.0, 4.0)}
    for alpha, r in runs.items():
        alphas = {float(t) for k, t in r.lora.items() if k.endswith(".alpha")}
        assert alphas == {alpha}
        modules = r.seen.session.network.lora_modules().values()
        assert {module.scale for module in modules} == {alpha / 4}
        # The trained module's weight delta is scale * up @ down, with the file's weights.
        name, module = next(iter(r.seen.session.network.lora_modules().items()))
        tensors = r.lora
        up, down = tensors[f"{name}.lora_up.weight"].float(), tensors[f"{name}.lora_down.weight"].float()
        delta = module.delta_weight()
        assert torch.allclose(delta.reshape(delta.shape[0], -1), alpha / 4 * up.flatten(1) @ down.flatten(1), atol=1e-7)
    # After the first update the LoRA acts on the model in proportion to alpha: step 2's loss differs.
    first, second = (runs[a].values("loss/current") for a in (1.0, 4.0))
    assert first[0] == pytest.approx(second[0], rel=1e-6) and first[1] != pytest.approx(second[1], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# 12-13. Total steps and the LR scheduler


@pytest.mark.parametrize("steps", [1, 3])
def test_max_train_steps_sets_the_number_of_steps(ws, steps):
    r = run(ws, max_train_steps=steps)
    assert r.steps() == list(range(1, steps + 1))
    assert r.result.global_step == steps
    assert read_lora_file(r.result.final_lora).metadata["ss_steps"] == str(steps)


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine", "constant_with_warmup"])
def test_lr_scheduler_shapes_the_logged_lr_as_the_planner_says(ws, scheduler):
    r = run(ws, lr_scheduler=scheduler, max_train_steps=4, lr_warmup_steps=2 if "warmup" in scheduler else 0)
    logged = r.values("lr/unet")
    assert logged == pytest.approx(list(make_plan(r.config).lr_schedule), rel=1e-6, abs=1e-12)
    flat = [1e-3] * 4
    if scheduler == "constant":
        assert logged == pytest.approx(flat)
    else:
        assert logged != pytest.approx(flat)
    if scheduler in ("linear", "cosine"):
        assert logged[-1] == pytest.approx(0.0, abs=1e-12) and logged[0] < 1e-3


# ---------------------------------------------------------------------------------------------
# 14-15. Noise offset and min-SNR gamma


def test_noise_offset_shifts_the_noise_of_each_channel(ws):
    plain = run(ws, max_train_steps=2)
    offset = run(ws, max_train_steps=2, noise_offset=0.1)
    assert len(plain.seen.batches) == len(offset.seen.batches) == 2
    for a, b in zip(plain.seen.batches, offset.seen.batches):
        shift = b.noise - a.noise
        per_channel = shift.mean(dim=(2, 3), keepdim=True)
        assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-5)  # one constant per channel
        assert 0.001 < per_channel.abs().max() < 0.5  # 0.1 * a standard normal draw
        assert torch.equal(a.timesteps, b.timesteps)
    assert plain.values("loss/current")[0] != offset.values("loss/current")[0]


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_min_snr_gamma_sets_the_loss_weights_of_the_run(ws, gamma):
    # Timesteps below 100 have SNR above 5, so min-SNR(5) weights are all below 1.
    r = run(ws, max_train_steps=2, max_timestep=100, min_snr_gamma=gamma)
    alphas = r.seen.session.components.noise_scheduler.alphas_cumprod
    for report in r.seen.batches:
        snr = alphas[report.timesteps] / (1 - alphas[report.timesteps])
        expected = torch.ones_like(snr) if gamma is None else torch.clamp(snr, max=gamma) / snr
        assert torch.allclose(report.weights, expected.float(), rtol=1e-5)
        if gamma is not None:
            assert (report.weights < 1).all()
    # The logged loss is the weighted one.
    last = r.seen.batches[-1]
    assert r.values("loss/current")[-1] == pytest.approx(float((last.per_sample_loss * last.weights).mean()), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# 16. Clip skip


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_changes_the_conditioning_fed_to_the_unet(ws, clip_skip):
    r = run(ws, clip_skip=clip_skip)
    fed = r.seen.conditioning[0]
    components = load_checkpoint(ws.checkpoint)
    ids = tokenize_captions(components.tokenizers[0], [CAPTION] * fed.shape[0])
    with torch.no_grad():
        by_layer = {
            skip: encode_text(
                components.family, components.text_encoders, [ids], eos_token_ids=[49407], clip_skip=skip
            ).encoder_hidden_states
            for skip in (1, 2)
        }
    # Step 1's text-encoder LoRA is still zero, so the run's conditioning is the base model's.
    assert torch.allclose(fed, by_layer[clip_skip], atol=1e-5)
    assert not torch.allclose(fed, by_layer[3 - clip_skip], atol=1e-2)


# ---------------------------------------------------------------------------------------------
# 17-18. Mixed precision and CPU threads


@pytest.mark.parametrize(("mixed_precision", "dtype"), [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_mixed_precision_sets_the_compute_dtype_inside_the_unet(ws, mixed_precision, dtype):
    r = run(ws, mixed_precision=mixed_precision, max_train_steps=2)
    assert r.seen.compute_dtypes == {dtype}
    # LoRA weights train in fp32 either way; bf16 autocast on CPU gives a close, finite loss.
    assert {p.dtype for p in r.seen.session.network.parameters()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in r.lora.values())
    reference = run(ws, max_train_steps=2).values("loss/current")
    assert r.values("loss/current") == pytest.approx(reference, rel=5e-2)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_threads_set_torch_threads_during_the_run(ws, threads):
    before = torch.get_num_threads()
    r = run(ws, num_cpu_threads_per_process=threads)
    assert r.seen.threads_in_step == [threads]
    assert torch.get_num_threads() == before  # the caller's setting is put back


# ---------------------------------------------------------------------------------------------
# 19. Base checkpoint


def test_base_checkpoint_is_hashed_in_the_manifest_and_changes_the_loss(ws):
    first = run(ws)
    second = run(ws, pretrained_model_name_or_path=str(ws.other_checkpoint))
    hashes = [r.manifest["base_model"]["legacy_hash"] for r in (first, second)]
    assert hashes == [legacy_model_hash(ws.checkpoint), legacy_model_hash(ws.other_checkpoint)]
    assert hashes[0] != hashes[1]
    assert read_lora_file(second.result.final_lora).metadata["ss_sd_model_hash"] == hashes[1]
    # Same data, noise and timesteps; another model predicts differently.
    assert torch.equal(first.seen.batches[0].noise, second.seen.batches[0].noise)
    assert first.values("loss/current")[0] != pytest.approx(second.values("loss/current")[0], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# 20. Regularisation images with prior loss weight


def test_regularisation_images_are_trained_with_the_prior_loss_weight(ws):
    plain = run(ws, max_train_steps=None, max_train_epochs=1)
    with_reg = run(ws, max_train_steps=None, max_train_epochs=1, reg_data_dir=ws.reg, prior_loss_weight=0.25)
    assert not any(report.is_reg.any() for report in plain.seen.batches)
    is_reg = torch.cat([report.is_reg for report in with_reg.seen.batches])
    weights = torch.cat([report.weights for report in with_reg.seen.batches])
    captions = [c for report in with_reg.seen.batches for c in report.captions]
    # One reg image per training image (sd-scripts' balancing), so the epoch doubles.
    assert int(is_reg.sum()) == int((~is_reg).sum()) == 4
    assert with_reg.steps() == [1, 2, 3, 4] and plain.steps() == [1, 2]
    assert torch.equal(weights[is_reg], torch.full((4,), 0.25))
    assert torch.equal(weights[~is_reg], torch.ones(4))
    assert {c for c, reg in zip(captions, is_reg.tolist()) if reg} == {"woman"}


# ---------------------------------------------------------------------------------------------
# 21. Optimizer


@pytest.mark.parametrize(
    ("optimizer_type", "learning_rate", "cls"),
    [
        ("AdamW", 1e-3, "torch.optim.adamw.AdamW"),
        ("SGDNesterov", 1e-3, "torch.optim.sgd.SGD"),
        ("DAdaptAdam", 1.0, "dadaptation.dadapt_adam.DAdaptAdam"),
        ("Prodigy", 1.0, "prodigyopt.prodigy.Prodigy"),
        ("Lion", 1e-4, "lion_pytorch.lion_pytorch.Lion"),
        ("AdamWScheduleFree", 1e-3, "schedulefree.adamw_schedulefree.AdamWScheduleFree"),
        ("Adafactor", 1e-3, "transformers.optimization.Adafactor"),
    ],
)
def test_optimizer_type_selects_the_run_optimizer(ws, optimizer_type, learning_rate, cls):
    # Adafactor with its own relative step ignores the learning rate: loralab asks for it off.
    args = "relative_step=False scale_parameter=False warmup_init=False" if optimizer_type == "Adafactor" else None
    r = run(ws, optimizer_type=optimizer_type, learning_rate=learning_rate, **({"optimizer_args": args} if args else {}))
    optimizer = r.seen.session.optimizer
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == cls
    assert read_lora_file(r.result.final_lora).metadata["ss_optimizer"].startswith(cls)
    if optimizer_type == "SGDNesterov":
        assert all(group["nesterov"] for group in optimizer.param_groups)
    # The step it took moved the LoRA away from its zero-initialised up weights.
    assert any(t.abs().max() > 0 for k, t in r.lora.items() if k.endswith("lora_up.weight"))
