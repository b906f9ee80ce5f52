"""The generation engine: images from prompts on any checkpoint, with LoRAs, as A1111 makes them.

:class:`GenerationEngine` renders :class:`ImageRequest` s. Each request names its checkpoint,
prompt (A1111 syntax, ``<lora:...>`` tags included), LoRAs given as options, sampler, steps, CFG,
seed, size and clip skip. The engine:

- checks every request before any model loads (:meth:`GenerationEngine.prepare`): size a multiple
  of 8, CFG above 0, known sampler, LoRA names found, LoRA family = checkpoint family (read from
  file headers), readable prompt syntax;
- renders requests grouped by checkpoint, so each checkpoint loads once however the requests are
  ordered (one model is kept loaded at a time, as A1111 does by default), and on a checkpoint
  grouped by LoRAs and strengths, so each set is fused once per call;
- fuses file LoRAs into the weights for the images that use them (``loralab.network.merge.fuse_loras``,
  as A1111 does: an image with LoRAs costs what one without does) and restores the original
  weights bit for bit when the LoRAs or their strengths change, when a call ends (on an error
  too) and on :meth:`GenerationEngine.close`, so between calls the model is always as loaded;
- encodes prompts as A1111 does (``embeddings.PromptEncoder``) and runs diffusers'
  ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``, built once per checkpoint from the
  loaded modules (no download, no safety checker), with those embeddings;
- draws each image's noise from its own CPU generator seeded with its seed, so an image depends
  on its seed only (not on its place in a batch or the device), and a CPU run is byte-identical
  when repeated.

When a prompt and its negative need different numbers of 75-token chunks, the shorter is padded
with chunks of the empty prompt (A1111's "pad prompt/negative prompt to be same length" option):
diffusers runs both through the UNet as one batch. Prompts of different lengths are never padded
to each other's length: a batch is split by length, so no image depends on its batch.

Each result carries its A1111 infotext (``png_info.GenerationParameters``) with model, VAE, LoRA
and embedding hashes; :meth:`GeneratedImage.save` writes it into the PNG.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
from PIL import Image

from loralab import __version__
from loralab.errors import LoralabError
from loralab.models.family import ModelFamily
from loralab.models.loading import StableDiffusionComponents, inspect_checkpoint, load_checkpoint
from loralab.network.lora import LoRANetwork
from loralab.network.lora_file import check_family
from loralab.network.merge import FusedLoras, LoraUse, fuse_loras
from loralab.sample.embeddings import EmbeddingLibrary, PromptEmbedding, PromptEncoder
from loralab.sample.hashes import checkpoint_short_hash
from loralab.sample.lora_library import LoraChoice, LoraLibrary
from loralab.sample.png_info import GenerationParameters, save_png
from loralab.sample.prompt_syntax import extract_lora_tags, warn_unsupported_syntax
from loralab.sample.samplers import SamplerSpec, build_scheduler, resolve_sampler

logger = logging.getLogger(__name__)

MAX_STEPS = 1000
MAX_SIDE = 8192
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
Loader = Callable[..., StableDiffusionComponents]


class GenerationError(LoralabError):
    """A generation setting is out of range."""


@dataclass(frozen=True)
class LoraRef:
    """A LoRA asked for by an option (not a prompt tag): a path or a name in the LoRA folder."""

    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float | None = None  # None: the same as te_multiplier


@dataclass(frozen=True)
class ImageRequest:
    """Everything one image depends on. ``prompt`` may hold ``<lora:...>`` tags (wildcards already expanded)."""

    checkpoint: Path
    prompt: str
    negative_prompt: str = ""
    loras: tuple[LoraRef, ...] = ()
    sampler: str = "Euler a"
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    clip_skip: int | None = None
    vae: Path | None = None


@dataclass
class GeneratedImage:
    """One rendered image, the request it answers, and its A1111 parameters."""

    image: Image.Image
    request: ImageRequest
    parameters: GenerationParameters

    @property
    def infotext(self) -> str:
        return self.parameters.to_text()

    def save(self, path: Path | str) -> Path:
        """Write the image as PNG with its ``parameters`` chunk (atomically)."""
        return save_png(self.image, path, self.infotext)


@dataclass(frozen=True)
class PreparedRequest:
    """A checked request: sampler resolved, LoRA tags taken out of the prompt, LoRA files found."""

    request: ImageRequest
    sampler: SamplerSpec
    prompt_text: str  # what the text encoder reads (tags removed)
    loras: tuple[LoraChoice, ...]
    family: ModelFamily

    @property
    def model_key(self) -> tuple[Path, Path | None]:
        return (_absolute(self.request.checkpoint), _absolute(self.request.vae) if self.request.vae else None)

    @property
    def lora_key(self) -> tuple[tuple[Path, float, float], ...]:
        """(file, text-encoder strength, UNet strength) per LoRA: equal keys render with equal weights."""
        return tuple((c.path, c.te_multiplier, c.unet_multiplier) for c in self.loras)

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call."""
        r = self.request
        return (self.model_key, self.lora_key, self.sampler, r.steps, r.cfg_scale, r.width, r.height, r.clip_skip)


@dataclass
class _LoadedModel:
    """One checkpoint in memory, its pipeline, the LoRA networks made for it and those fused now."""

    key: tuple[Path, Path | None]
    components: StableDiffusionComponents
    pipeline: Any
    networks: dict[tuple[Path, int], LoRANetwork] = field(default_factory=dict)
    fused: FusedLoras | None = None
    fused_key: tuple[tuple[Path, float, float], ...] = ()  # PreparedRequest.lora_key of the fused LoRAs
    encoders: dict[int | None, PromptEncoder] = field(default_factory=dict)
    owned: bool = True  # loaded by the engine (False: components lent by the caller, see use_components)


def build_pipeline(components: StableDiffusionComponents, scheduler: Any) -> Any:
    """A diffusers text-to-image pipeline over ``components``' own modules (no copies, no download)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if components.family is ModelFamily.SDXL:
        pipeline = StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            unet=components.unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            unet=components.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def check_settings(request: ImageRequest) -> None:
    """Raise ``GenerationError`` for a size, CFG, step count, seed or clip skip out of range."""
    for name, value in (("width", request.width), ("height", request.height)):
        if value < 8 or value % 8:
            raise GenerationError(f"{name} {value} must be a positive multiple of 8 (e.g. {max(8, value - value % 8)})")
        if value > MAX_SIDE:
            raise GenerationError(f"{name} {value} is above {MAX_SIDE}; render smaller and upscale")
    if not (request.cfg_scale > 0 and math.isfinite(request.cfg_scale)):
        raise GenerationError(f"CFG scale {request.cfg_scale:g} must be above 0 (A1111's usual range is 3 to 12)")
    if not SEED_RANGE[0] <= request.seed <= SEED_RANGE[1]:
        raise GenerationError(f"seed {request.seed} is outside torch's seed range ({SEED_RANGE[0]} to {SEED_RANGE[1]})")
    if not 1 <= request.steps <= MAX_STEPS:
        raise GenerationError(f"steps {request.steps} must be between 1 and {MAX_STEPS}")
    if request.clip_skip is not None and request.clip_skip < 1:
        raise GenerationError(f"clip skip {request.clip_skip} must be 1 or more (1 = last layer)")


class GenerationEngine:
    """Renders :class:`ImageRequest` s (see the module docstring).

    ``lora_dir``: where LoRA names resolve. ``embeddings``: textual inversions prompts may name.
    ``emphasis``: A1111's emphasis mode. ``device``/``dtype``: where and in what precision models
    run. ``loader``: loads a checkpoint (``load_checkpoint``'s signature); ``load_count`` counts
    its calls.
    """

    def __init__(
        self,
        *,
        lora_dir: Path | str | None = None,
        embeddings: EmbeddingLibrary | None = None,
        emphasis: str = "Original",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        loader: Loader = load_checkpoint,
    ) -> None:
        self.loras = LoraLibrary(lora_dir)
        self.embeddings = embeddings
        self.emphasis = emphasis
        self.device = torch.device(device)
        self.dtype = dtype
        self._loader = loader
        self.load_count = 0
        self._model: _LoadedModel | None = None
        self._families: dict[Path, ModelFamily] = {}

    # --- checking --------------------------------------------------------------------------------

    def _family(self, checkpoint: Path) -> ModelFamily:
        key = _absolute(checkpoint)
        if key not in self._families:
            self._families[key] = inspect_checkpoint(checkpoint).family
        return self._families[key]

    @property
    def components(self) -> StableDiffusionComponents | None:
        """The model in memory (None before the first image), e.g. to compare against another pipeline."""
        return self._model.components if self._model is not None else None

    def use_components(self, components: StableDiffusionComponents, name: str = "in-memory") -> Path:
        """Render on ``components`` already in memory (a model being trained, say) instead of loading.

        Returns the checkpoint path to put in requests for them. LoRA files the requests name are
        fused into the weights during each call and restored after it; networks the components
        carry as modules (a LoRA being trained) stay as they are, applied on top.
        """
        self.close()
        key = _absolute(Path(name))
        self._families[key] = components.family
        scheduler = build_scheduler(resolve_sampler("Euler"), components.noise_scheduler)
        self._model = _LoadedModel((key, None), components, build_pipeline(components, scheduler), owned=False)
        return key

    def render(
        self,
        checkpoint: Path | str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        loras: Sequence[LoraRef] = (),
        batch_size: int = 1,
        **settings: Any,
    ) -> list[GeneratedImage]:
        """Every prompt with every seed on ``checkpoint`` with ``loras`` (prompt-major order).

        ``settings`` are the other :class:`ImageRequest` fields (``negative_prompt``, ``sampler``,
        ``steps``, ``cfg_scale``, ``width``, ``height``, ``clip_skip``, ``vae``). Each result carries
        its request and A1111 parameters. Raises what :meth:`prepare` raises.
        """
        requests = [
            ImageRequest(Path(checkpoint), prompt, loras=tuple(loras), seed=seed, **settings)
            for prompt in prompts
            for seed in seeds
        ]
        return self.generate(requests, batch_size=batch_size)

    def _option_lora(self, ref: LoraRef) -> LoraChoice:
        path = self.loras.resolve(ref.name)
        # A path is named by its file name in the infotext (as A1111 names files in its Lora folder).
        name = path.stem if Path(ref.name).expanduser().is_file() else ref.name.removesuffix(".safetensors")
        unet = ref.te_multiplier if ref.unet_multiplier is None else ref.unet_multiplier
        return LoraChoice(path, name, ref.te_multiplier, unet)

    def prepare(self, requests: Sequence[ImageRequest]) -> list[PreparedRequest]:
        """Check every request without loading a model; raises the first problem as a ``LoralabError``."""
        prepared = []
        for request in requests:
            check_settings(request)
            if request.vae is not None and not request.vae.exists():
                raise GenerationError(f"VAE not found: {request.vae}")
            sampler = resolve_sampler(request.sampler)
            family = self._family(request.checkpoint)
            text, tags = extract_lora_tags(request.prompt)
            if extract_lora_tags(request.negative_prompt)[1]:
                raise GenerationError(
                    f"<lora:...> tags work in the prompt, not in the negative prompt ({request.negative_prompt[:60]!r})"
                )
            warn_unsupported_syntax(text)
            choices = [self._option_lora(ref) for ref in request.loras]
            choices += [
                LoraChoice(self.loras.resolve(tag.name), tag.name, tag.te_multiplier, tag.unet_multiplier, in_prompt=True)
                for tag in tags
            ]
            for choice in choices:
                check_family(self.loras.read(choice.path), family)
            prepared.append(PreparedRequest(request, sampler, text, tuple(choices), family))
        return prepared

    # --- rendering -------------------------------------------------------------------------------

    def generate(self, requests: Sequence[ImageRequest], *, batch_size: int = 1) -> list[GeneratedImage]:
        """Render ``requests``; results come back in request order. See :meth:`iter_generate`."""
        results: list[GeneratedImage | None] = [None] * len(requests)
        for index, image in self.iter_generate(requests, batch_size=batch_size):
            results[index] = image
        return [image for image in results if image is not None]

    def iter_generate(
        self, requests: Sequence[ImageRequest], *, batch_size: int = 1
    ) -> Iterator[tuple[int, GeneratedImage]]:
        """Yield ``(index in requests, image)`` as images are made: checkpoint by checkpoint, and on
        each checkpoint LoRA set by LoRA set (requests with the same LoRAs and strengths in a row).

        All requests are checked first (:meth:`prepare`). Up to ``batch_size`` consecutive requests
        that differ only in prompt and seed share one pipeline call. When the iteration ends, fails
        or is abandoned, fused LoRAs are taken out of the weights again.
        """
        if batch_size < 1:
            raise GenerationError(f"batch size {batch_size} must be 1 or more")
        prepared = self.prepare(requests)
        groups = _grouped_by_model(prepared)
        if self._model is not None:  # the model already in memory goes first: one load fewer
            groups.sort(key=lambda group: prepared[group[0]].model_key != self._model.key)  # type: ignore[union-attr]
        try:
            for group in groups:
                for batch in _batches(group, prepared, batch_size):
                    images = self._render([prepared[i] for i in batch])
                    yield from zip(batch, images)
        finally:
            # Callers may read or train the components between calls (engine.components,
            # use_components): they must find the weights as loaded.
            self._unfuse()

    def _render(self, batch: Sequence[PreparedRequest]) -> list[GeneratedImage]:
        first = batch[0]
        model = self._use_model(first.model_key)
        self._activate_loras(model, first)
        encoder = self._encoder(model, first.request.clip_skip)
        positives = [encoder.encode(p.prompt_text) for p in batch]
        negatives = [encoder.encode(p.request.negative_prompt, negative=True) for p in batch]
        # Prompts of different lengths run in separate calls: padding one to another's length would
        # make an image depend on what else is in its batch.
        lengths = [max(pos.num_chunks, neg.num_chunks) for pos, neg in zip(positives, negatives)]
        images: list[Image.Image | None] = [None] * len(batch)
        for length in dict.fromkeys(lengths):
            members = [i for i, n in enumerate(lengths) if n == length]
            rendered = self._call_pipeline(
                model, [batch[i] for i in members], [positives[i] for i in members], [negatives[i] for i in members],
                encoder, length,
            )  # fmt: skip
            for i, image in zip(members, rendered):
                images[i] = image
        return [
            GeneratedImage(image, p.request, self._parameters(p, (*pos.embeddings, *neg.embeddings)))
            for image, p, pos, neg in zip(images, batch, positives, negatives)
        ]

    def _call_pipeline(
        self,
        model: _LoadedModel,
        batch: Sequence[PreparedRequest],
        positives: Sequence[PromptEmbedding],
        negatives: Sequence[PromptEmbedding],
        encoder: PromptEncoder,
        chunks: int,
    ) -> list[Image.Image]:
        """One diffusers call for requests whose prompts and negatives pad to ``chunks`` chunks."""
        padding = encoder.encode("") if any(e.num_chunks < chunks for e in (*positives, *negatives)) else None

        def stacked(embeddings: Sequence[PromptEmbedding]) -> torch.Tensor:
            return torch.cat([_padded(e.hidden, chunks, padding) for e in embeddings])

        request = batch[0].request
        seeds = [p.request.seed for p in batch]
        model.pipeline.scheduler = build_scheduler(batch[0].sampler, model.components.noise_scheduler, noise_seed=seeds[0])
        kwargs: dict[str, Any] = {
            "prompt_embeds": stacked(positives),
            "negative_prompt_embeds": stacked(negatives),
            "width": request.width,
            "height": request.height,
            "num_inference_steps": request.steps,
            "guidance_scale": request.cfg_scale,
            "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            "output_type": "pil",
        }
        if model.components.family is ModelFamily.SDXL:
            kwargs["pooled_prompt_embeds"] = torch.cat([e.pooled for e in positives])
            kwargs["negative_pooled_prompt_embeds"] = torch.cat([e.pooled for e in negatives])
        try:
            return model.pipeline(**kwargs).images
        except torch.OutOfMemoryError:
            raise self._out_of_memory(request, len(batch)) from None
        except RuntimeError as exc:
            if "can't allocate memory" in str(exc) or "out of memory" in str(exc):  # the CPU allocator's words
                raise self._out_of_memory(request, len(batch)) from None
            raise

    def _out_of_memory(self, request: ImageRequest, batch_size: int) -> GenerationError:
        return GenerationError(
            f"out of memory rendering {batch_size} image(s) of {request.width}x{request.height} on {self.device}; "
            "use a smaller size or --batch"
        )

    # --- models and LoRAs ------------------------------------------------------------------------

    def _use_model(self, key: tuple[Path, Path | None]) -> _LoadedModel:
        if self._model is not None and self._model.key == key:
            return self._model
        self.close()  # one checkpoint in memory at a time
        checkpoint, vae = key
        components = self._loader(checkpoint, vae_path=vae, dtype=self.dtype, device=self.device)
        self.load_count += 1
        scheduler = build_scheduler(resolve_sampler("Euler"), components.noise_scheduler)
        self._model = _LoadedModel(key, components, build_pipeline(components, scheduler))
        return self._model

    def _activate_loras(self, model: _LoadedModel, prepared: PreparedRequest) -> None:
        """Make ``prepared``'s LoRAs the ones fused into the weights (nothing to do when they already are).

        Another set or other strengths restore the original weights first and fuse anew: deltas
        are never subtracted, so no rounding accumulates however often LoRAs switch.
        """
        key = prepared.lora_key
        if model.fused is not None and key == model.fused_key:
            return
        self._unfuse()
        uses = []
        seen: dict[Path, int] = {}
        for choice in prepared.loras:
            occurrence = seen[choice.path] = seen.get(choice.path, -1) + 1  # same file twice: two networks
            network_key = (choice.path, occurrence)
            if network_key not in model.networks:
                lora_file = self.loras.read(choice.path)
                model.networks[network_key] = LoRANetwork.from_lora_file(lora_file, model.components)
            uses.append(
                LoraUse(model.networks[network_key], unet_multiplier=choice.unet_multiplier,
                        text_encoder_multiplier=choice.te_multiplier)
            )  # fmt: skip
        model.fused = fuse_loras(model.components, uses)
        model.fused_key = key

    def _unfuse(self) -> None:
        """Restore the loaded model's original weights where LoRAs are fused into them."""
        model = self._model
        if model is not None and model.fused is not None:
            model.fused.restore()
            model.fused, model.fused_key = None, ()

    def _encoder(self, model: _LoadedModel, clip_skip: int | None) -> PromptEncoder:
        if clip_skip not in model.encoders:
            model.encoders[clip_skip] = PromptEncoder(
                model.components, clip_skip=clip_skip, embeddings=self.embeddings, emphasis=self.emphasis
            )
        return model.encoders[clip_skip]

    def close(self) -> None:
        """Drop the loaded model (its LoRA networks too) and free its memory."""
        if self._model is not None:
            self._unfuse()
            owned, self._model = self._model.owned, None
            # Lent components stay in memory with their owner: nothing to free (and a training
            # run that samples would pay for a collection and a refilled CUDA cache each time).
            if owned:
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- infotext --------------------------------------------------------------------------------

    def _parameters(self, prepared: PreparedRequest, embeddings: Sequence[Any]) -> GenerationParameters:
        request = prepared.request
        option_tags = " ".join(c.tag for c in prepared.loras if not c.in_prompt)
        prompt = f"{request.prompt} {option_tags}".strip() if option_tags else request.prompt
        uses_brackets = any(ch in request.prompt + request.negative_prompt for ch in "([")
        return GenerationParameters(
            prompt=prompt,
            negative_prompt=request.negative_prompt,
            steps=request.steps,
            sampler=prepared.sampler.a1111_name,
            schedule_type=prepared.sampler.schedule_type,
            cfg_scale=request.cfg_scale,
            seed=request.seed,
            width=request.width,
            height=request.height,
            model_hash=checkpoint_short_hash(request.checkpoint),
            model=_model_name(request.checkpoint),
            vae_hash=checkpoint_short_hash(request.vae) if request.vae else None,
            vae=request.vae.name if request.vae else None,
            clip_skip=request.clip_skip,
            lora_hashes={c.name: self.loras.short_hash(c.path) for c in prepared.loras},
            ti_hashes={e.name: e.short_hash for e in embeddings},
            emphasis=self.emphasis if self.emphasis != "Original" and uses_brackets else None,
            version=f"loralab {__version__}",
        )


def _absolute(path: Path) -> Path:
    """One key per file however it is written (relative, with ``~``)."""
    return path.expanduser().absolute()


def _model_name(checkpoint: Path) -> str:
    return checkpoint.name if checkpoint.is_dir() else checkpoint.stem


def _padded(hidden: torch.Tensor, chunks: int, padding: PromptEmbedding | None) -> torch.Tensor:
    missing = chunks - hidden.shape[1] // 77
    if missing <= 0:
        return hidden
    assert padding is not None
    return torch.cat([hidden, padding.hidden.to(hidden.dtype).repeat(1, missing, 1)], dim=1)


def _grouped_by_model(prepared: Sequence[PreparedRequest]) -> list[list[int]]:
    """Request indices per checkpoint (and VAE), groups in order of first appearance.

    Inside a group, requests with the same LoRAs and strengths follow each other (sets in order of
    first appearance): a sweep's images alternate LoRA weights, and each switch restores and
    fuses the weights anew.
    """
    groups: dict[tuple[Path, Path | None], dict[tuple[Any, ...], list[int]]] = {}
    for index, item in enumerate(prepared):
        groups.setdefault(item.model_key, {}).setdefault(item.lora_key, []).append(index)
    return [[index for run in by_loras.values() for index in run] for by_loras in groups.values()]


def _batches(indices: Sequence[int], prepared: Sequence[PreparedRequest], batch_size: int) -> Iterator[list[int]]:
    """Runs of consecutive requests with one batch key, at most ``batch_size`` long."""
    batch: list[int] = []
    for index in indices:
        if batch and (len(batch) == batch_size or prepared[index].batch_key() != prepared[batch[0]].batch_key()):
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch
