"""Text models served by OpenVINO: an exported IR (utils/runtimes/exporter.py) stepped by
openvino-genai's ContinuousBatchingPipeline, behind the same manager, engine interface and APIs.

Why the ContinuousBatchingPipeline: it takes each request with its own GenerationConfig (sampling,
top_p / top_k, repetition penalty, seed, max_new_tokens) and lets requests join and leave between
steps, which is what our engine does for PyTorch text models. Its `step()` runs one scheduler step
for every running request; our engine thread alone calls it (one owner of the compute), reads each
request's new tokens and hands them to the same RowState as the PyTorch engine (eos, stop strings,
max_new_tokens, streaming, cancellation and deadlines), then cancels in OpenVINO the rows it closed.

`step()` holds the GIL for the whole step, so before a step the engine waits (bounded) while requests of
the process are busy in Python (utils/engine/arrivals.py): they join the next step together instead of
a few lines of Python per step.

Prompts are tokenized by the checkpoint's own transformers tokenizer and chat template (exactly as
for PyTorch: same prompt ids, same special-token checks), and answers decoded by it: the OpenVINO
tokenizer the export converts is not used for serving.

Precision: OpenVINO computes in bf16 on CPUs with AMX by default; the model's `dtype` is its
INFERENCE_PRECISION_HINT (float32 -> f32, bfloat16 -> bf16, float16 -> f16; auto: OpenVINO's
choice). With f32 and fp32 weights its greedy tokens equal PyTorch float32's (tests/test_openvino.py).
"""
from __future__ import annotations

import gc
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from utils.config.settings import ModelSpec
from utils.engine.arrivals import ARRIVALS
from utils.engine.engine import Engine, Job
from utils.engine.rows import RowState
from utils.families.base import GenerationParams, check_processor
from utils.families.text import TextFamily
from utils.runtimes.exporter import IR_NAME, OpenVINOCache
from utils.serving.memory import LOAD_OVERHEAD, MIN_ESTIMATE, _safetensors_header, _tensor_bytes

log = logging.getLogger("model_server.openvino")

# openvino-genai's step() holds the GIL (utils/engine/arrivals.py): before a step the engine waits for
# requests busy in Python, at most this share of a step while rows run (their decode waits meanwhile),
# at most one step when none runs (nobody but the newcomers waits), and at least MIN_PAUSE seconds.
PAUSE_SHARE = 0.1
MIN_PAUSE = 0.002
PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


class OpenVINOModel:
    """What the family code reads from `adapter.model`: the pipeline, the checkpoint's config and
    generation config, the device inputs are built on (host memory), the IR's bytes."""

    def __init__(self, pipeline: Any, folder: Path, config: Any, generation_config: Any, ov_device: str) -> None:
        self.pipeline, self.folder = pipeline, folder
        self.config, self.generation_config = config, generation_config
        self.ov_device = ov_device
        self.device = "cpu"  # prompts are tensors in host memory; OpenVINO copies them where it runs
        self.bytes = sum(p.stat().st_size for p in folder.glob("openvino_model.*"))


class OpenVINOTextAdapter(TextFamily):
    """A text family adapter whose model is an OpenVINO pipeline (the manager and the routes see a
    family adapter like any other)."""

    continuous_batching = False  # not the PyTorch continuous engine: engine_class below

    @property
    def engine_class(self) -> type[Engine]:
        return OpenVINOEngine

    @classmethod
    def load_openvino(cls, spec: ModelSpec, cache: OpenVINOCache) -> "OpenVINOTextAdapter":
        """Export when missing (or when the entry cannot be read: exported again, once), then the
        pipeline on OpenVINO's device and the checkpoint's tokenizer."""
        import transformers  # deferred: transformers

        processor = getattr(transformers, cls.processor_class).from_pretrained(spec.path)
        check_processor(cls, spec, processor)
        config = transformers.AutoConfig.from_pretrained(spec.path)
        try:
            generation_config = transformers.GenerationConfig.from_pretrained(spec.path)
        except OSError:
            generation_config = transformers.GenerationConfig.from_model_config(config)
        folder = cache.ensure(spec)
        try:
            pipeline, device = _pipeline(spec, folder)
        except (RuntimeError, OSError) as exc:
            if not (folder / IR_NAME).is_file() or "out of memory" in str(exc).lower():
                raise
            cache.discard(folder, f"{type(exc).__name__}: {str(exc)[:200]}")
            folder = cache.ensure(spec)
            pipeline, device = _pipeline(spec, folder)
        model = OpenVINOModel(pipeline, folder, config, generation_config, device)
        return cls(spec, "cpu", model, processor)

    def memory_bytes(self) -> int:
        return self.model.bytes if self.model is not None else 0

    def memory_placement(self) -> dict[str, int]:
        return {"cpu": self.memory_bytes()} if self.model is not None else {}

    def weight_modules(self) -> list[Any]:
        return []  # no torch modules: the RAM tier has nothing to move

    def park(self, *, pin_memory: bool) -> None:
        raise RuntimeError("an OpenVINO model lives in host memory already; it is unloaded, not parked")

    def release(self) -> None:
        self.model = None
        self.processor = None
        gc.collect()

    def generation_config(self, params: GenerationParams) -> Any:
        """One request's openvino_genai.GenerationConfig (every parameter our APIs take maps per request)."""
        import openvino_genai  # deferred: openvino

        config = openvino_genai.GenerationConfig()
        config.max_new_tokens = params.max_new_tokens
        eos = sorted(self._eos_ids())
        if eos:
            config.eos_token_id = eos[0]
            config.stop_token_ids = set(eos)
        config.repetition_penalty = params.repetition_penalty if params.repetition_penalty is not None else 1.0
        config.do_sample = params.do_sample
        if params.do_sample:
            config.temperature = params.temperature
            config.top_p = params.top_p
            if params.top_k:
                config.top_k = params.top_k
            # A request without a seed draws fresh (OpenVINO's default seed would repeat every answer).
            config.rng_seed = params.seed if params.seed is not None else secrets.randbits(63)
        return config


def _pipeline(spec: ModelSpec, folder: Path) -> tuple[Any, str]:
    import openvino  # deferred: openvino
    import openvino_genai  # deferred: openvino

    device = _ov_device(spec.device, openvino.Core().available_devices)
    properties = {}
    if spec.dtype in PRECISION_HINTS:
        properties["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[spec.dtype]
    scheduler = openvino_genai.SchedulerConfig()
    scheduler.max_num_seqs = spec.engine.max_batch_size
    scheduler.cache_size = 0  # 0: the KV cache grows with what runs instead of reserving gigabytes up front
    scheduler.enable_prefix_caching = False  # an answer must not depend on which prompts came before
    started = time.perf_counter()
    pipeline = openvino_genai.ContinuousBatchingPipeline(str(folder), scheduler, device, properties)
    log.info("%s: OpenVINO pipeline on %s (%s) in %.2fs", spec.key, device, properties or "default precision",
             time.perf_counter() - started)
    return pipeline, device


def _ov_device(configured: str, available: list[str]) -> str:
    """auto: an Intel GPU when OpenVINO sees one, else the CPU; gpu / gpu.N: that GPU or a load error."""
    if configured == "auto":
        return "GPU" if any(d.startswith("GPU") for d in available) else "CPU"
    wanted = configured.upper()
    if wanted != "CPU" and wanted not in available and not (wanted == "GPU" and "GPU.0" in available):
        raise RuntimeError(f"OpenVINO sees no {wanted} on this machine (it sees {', '.join(available)})")
    return wanted


class OpenVINORow:
    """One running request: its RowState (ours) and its handle in the pipeline."""

    def __init__(self, job: Job, adapter: OpenVINOTextAdapter, handle: Any) -> None:
        self.job, self.handle = job, handle
        self.cancelled = False  # ended by us while OpenVINO still ran it
        self.state = RowState(job, eos_ids=adapter._eos_ids(), tokenizer=adapter._tokenizer(),
                              build_result=adapter.result_from_tokens)

    def take_tokens(self) -> None:
        """The tokens the last step produced, into the row's state (which may close the row)."""
        if self.handle.can_read():
            for output in self.handle.read().values():
                for token in output.generated_ids:
                    if self.state.done:
                        return
                    self.state.add(int(token))

    def settle(self) -> bool:
        """After a step: True when the row is over (it is cancelled in OpenVINO if it still runs there)."""
        import openvino_genai  # deferred: openvino

        self.state.close_if_cancelled()
        running = self.handle.get_status() == openvino_genai.GenerationStatus.RUNNING
        if self.state.done:
            if running:  # e.g. a stop string, a client gone, a deadline: its KV blocks go at the next step
                self.handle.cancel()
                self.cancelled = True
            return True
        if not running:  # OpenVINO ended it (its max_new_tokens): whatever it has
            self.take_tokens()
            self.state.close("length")
        return self.state.done


class OpenVINOEngine(Engine):
    """Our engine's queue, admission, cancellation and metrics around openvino-genai's scheduler."""

    kind = "openvino"

    def _run(self) -> None:
        import numpy  # deferred: openvino
        import openvino  # deferred: openvino

        pipeline = self.adapter.model.pipeline
        rows: list[OpenVINORow] = []
        step_seconds = 0.0  # the last step's
        while True:
            with self._cond:
                while not self._queue and not rows and not self._stopping:
                    self._cond.wait()
                if not self._queue and not rows:
                    return
            if ARRIVALS.busy():  # the step will hold the GIL: requests busy in Python move first
                ARRIVALS.wait_quiet(max(MIN_PAUSE, step_seconds * (PAUSE_SHARE if rows else 1.0)))
            with self._cond:
                joining = self._take_joining(self.max_batch_size - len(rows))
                self._running = [row.job for row in rows] + joining
            self._observe("on_batch", self.key, len(rows) + len(joining))
            self._peak = max(self._peak, len(rows) + len(joining))
            finished: list[int] = []
            try:
                for job in joining:
                    ids = numpy.asarray(job.prepared["input_ids"], dtype=numpy.int64).reshape(1, -1)
                    handle = pipeline.add_request(job.id, openvino.Tensor(ids),
                                                  self.adapter.generation_config(job.params))
                    rows.append(OpenVINORow(job, self.adapter, handle))
                started = time.perf_counter()
                pipeline.step()
                step_seconds = time.perf_counter() - started
                for row in rows:
                    row.take_tokens()
                still, reap = [], False
                for row in rows:
                    if row.settle():
                        finished.append(len(row.state.tokens))
                        reap = reap or row.cancelled
                    else:
                        still.append(row)
                rows = still
                if reap and not rows:  # nothing else will step soon: free the cancelled rows' blocks now
                    pipeline.step()
            except Exception as exc:
                log.error("OpenVINO step of %s failed (%s); failing its %d rows", self.key, type(exc).__name__,
                          len(rows), exc_info=True)
                for row in rows:
                    row.job.fail(exc)
                    try:
                        row.handle.cancel()
                    except Exception:  # noqa: BLE001 - the pipeline may be past answering
                        pass
                for job in joining:
                    job.fail(exc)
                rows = []
            with self._cond:
                self._running = [row.job for row in rows]
            self._count(len(joining), finished)


def estimate_openvino_bytes(spec: ModelSpec, cache: OpenVINOCache) -> int:
    """The export's bytes when it exists (the compressed IR is what loads); else a prediction from
    the safetensors headers at the weight format's bytes per element."""
    folder = cache.find(cache.identity_of(spec))
    if folder is not None:
        return max(MIN_ESTIMATE, int(sum(p.stat().st_size for p in folder.glob("openvino_model.*")) * LOAD_OVERHEAD))
    per_element = {"int4": 0.5 + 4 / 128, "int8": 1.0 + 4 / 4096}.get(spec.weight_format)
    target = {"fp16": 2, "fp32": 4}.get(spec.weight_format, 1)  # int4/int8: embeddings in int8 too
    total = 0.0
    for path in sorted(spec.path.glob("*.safetensors")):
        try:
            total += sum(size for _, size in _tensor_bytes(_safetensors_header(path), target, per_element))
        except (OSError, ValueError):
            total += path.stat().st_size
    return max(MIN_ESTIMATE, int(total * LOAD_OVERHEAD))
