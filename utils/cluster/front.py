"""The Flask front's side of backend ray: Cluster starts (or joins) Ray, deploys one Serve
application per model group and maps Ray's failures to domain errors; ClusterManager and
RayInference stand where the local ModelManager and InferenceService stand, with the interface the
routes already call, so the routes do not change.

Failures: a replica that died, is restarting or does not answer is a 503 with Retry-After
(ReplicaUnavailable), never a 500 or a hang; Serve replaces it. Domain errors raised in a replica
come back as the same error (status and body). Anything else from a replica is a bug of ours: 500.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from utils.cluster.replica import ModelReplica
from utils.config.settings import settings_env
from utils.errors import InvalidInput, ModelUnavailable, RequestTimeout, ServerError, UnknownModel
from utils.families import GenerationResult
from utils.serving.inference import InferenceService, choice_params

log = logging.getLogger("model_server.cluster")
ROOT = Path(__file__).resolve().parent.parent.parent
RETRY_AFTER = 2.0        # seconds: about how long Serve takes to route around a dead replica
POLL_SECONDS = 0.25      # how often a waiting request checks whether its client left
LOAD_ALLOWANCE = 600.0   # seconds a request may wait beyond its deadline and queue time (a slow load)
STATUS_TTL = 1.0         # seconds one fan-out of status calls serves (a dashboard refresh reads it ~5 times)


class ReplicaUnavailable(ModelUnavailable):
    error = "replica unavailable"


class StillLoading(ModelUnavailable):
    """An admin load / unload outlived its allowance: the replica is busy loading, not gone."""
    error = "still loading"


@contextmanager
def ray_errors(what: str) -> Iterator[None]:
    """Ray's failures as domain errors: 503 for a replica that is gone or busy; 500 for a bug."""
    from ray.exceptions import RayError, RayTaskError  # deferred: ray
    from ray.serve.exceptions import RayServeException  # deferred: ray
    try:
        yield
    except ServerError:
        raise
    except RayTaskError as exc:
        if isinstance(exc.cause, (RayError, RayServeException)):
            raise _unavailable(what, exc.cause) from None
        raise RuntimeError(f"{what} failed in a replica: {exc.cause!r}") from exc
    except (RayError, RayServeException, TimeoutError) as exc:
        raise _unavailable(what, exc) from None


def _unavailable(what: str, exc: BaseException) -> ReplicaUnavailable:
    log.warning("%s: replica unavailable: %s", what, type(exc).__name__)
    return ReplicaUnavailable(f"{what}: the replica serving it is unavailable ({type(exc).__name__}); it is "
                              f"being replaced, retry shortly", retry_after=RETRY_AFTER)


def unwrap(outcome: tuple) -> Any:
    kind, value = outcome
    if kind == "error":
        raise value
    return value


class Cluster:
    """Ray and the Serve applications, from the front's process (the gunicorn worker)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.handles: dict[str, Any] = {}   # group name -> DeploymentHandle
        self._by_key: dict[tuple, Any] = {}  # (model key, stream) -> its group's handle with those options
        self.started_ray = False
        self._status_lock = threading.Lock()
        self._statuses: dict[str, dict] = {}
        self._status_at = float("-inf")

    # ------------------------------------------------------------------ start and stop

    def start(self) -> "Cluster":
        import ray  # deferred: ray
        from ray import serve  # deferred: ray
        rs = self.settings.ray
        if not ray.is_initialized():
            drain = signal.getsignal(signal.SIGTERM)  # ray.init replaces it with sys.exit: gunicorn drains
            env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            if rs.address:  # an existing cluster: ship the code; models_dir must exist on every node
                ray.init(address=rs.address, include_dashboard=False, logging_level=logging.WARNING,
                         runtime_env={"working_dir": str(ROOT), "env_vars": {"PYTHONPATH": "."},
                                      "excludes": ["models/", "tmp/", "logs/", ".git/", ".venv/", "bench/results/"]})
            else:
                ray.init(num_cpus=rs.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                         runtime_env={"env_vars": env})
                self.started_ray = True
            if drain is not None:
                signal.signal(signal.SIGTERM, drain)
        serve.start(proxy_location="Disabled")  # the front is Flask; no Serve HTTP proxy
        gpus = float(ray.cluster_resources().get("GPU", 0))
        for group in rs.groups:
            self.handles[group.name] = serve.run(self._deployment(group, gpus).bind(for_replicas(self.settings),
                                                                                    group.name),
                                                 name=self.app(group.name), route_prefix=None,
                                                 logging_config={"enable_access_log": False, "log_level": "WARNING"})
        for name in self.handles:  # routers know their replicas before the first request
            self._wait_for_replicas(name)
        return self

    def _deployment(self, group: Any, gpus: float):
        from ray import serve  # deferred: ray
        from ray.serve.config import RequestRouterConfig  # deferred: ray

        from utils.cluster.router import TargetedRouter  # deferred: ray
        num_gpus = group.num_gpus if group.num_gpus is not None else (1.0 if gpus else 0.0)
        scaling: dict[str, Any] = {}
        if group.min_replicas is not None:
            # a replica takes about one engine batch at once before Serve starts another
            scaling["autoscaling_config"] = {"min_replicas": group.min_replicas, "max_replicas": group.max_replicas,
                                             "initial_replicas": group.replicas or group.min_replicas or 1,
                                             "target_ongoing_requests": self.settings.engine.max_batch_size}
        else:  # default: one replica per GPU of the cluster
            scaling["num_replicas"] = group.replicas or (max(1, int(gpus // num_gpus)) if num_gpus else 1)
        return serve.deployment(
            ModelReplica, name="ModelReplica",
            ray_actor_options={"num_cpus": group.num_cpus, "num_gpus": num_gpus},
            max_ongoing_requests=self.settings.ray.max_ongoing_requests,
            health_check_period_s=self.settings.ray.health_check_period,
            health_check_timeout_s=max(10.0, 5 * self.settings.ray.health_check_period),
            # a replica that autoscaling (or a redeploy) removes finishes its generations first
            graceful_shutdown_timeout_s=self.settings.request_timeout,
            request_router_config=RequestRouterConfig(request_router_class=TargetedRouter,
                                                      request_router_kwargs={"app": self.app(group.name)}),
            **scaling)

    def _wait_for_replicas(self, group: str, timeout: float = 60.0) -> None:
        from utils.cluster.router import replica_ids  # deferred: ray
        self.handles[group].status.remote().result(timeout_s=timeout)  # creates the router
        deadline = time.monotonic() + timeout
        while not replica_ids(self.app(group)) and time.monotonic() < deadline:
            time.sleep(0.05)

    def app(self, group: str) -> str:
        """The Serve application of a group; the prefix (ray.app_prefix) keeps two fronts on one
        cluster from redeploying each other's applications."""
        return self.settings.ray.app_prefix + group

    def stop(self) -> None:
        """At the worker's exit: Serve and Ray go too when this process started them; on a joined
        cluster only this server's applications go (their replicas would hold models for nobody)."""
        try:
            import ray  # deferred: ray
            from ray import serve  # deferred: ray
            if self.started_ray:
                serve.shutdown()
                ray.shutdown()
            else:
                for group in self.handles:
                    serve.delete(self.app(group))
        except Exception:
            log.exception("stopping Ray failed")

    # ------------------------------------------------------------------ calls

    def handle(self, key: str, stream: bool = False) -> Any:
        """The handle a request for `key` goes through: routed to a replica that holds the model."""
        handle = self._by_key.get((key, stream))
        if handle is None:
            group = self.settings.ray.group_of(key).name
            handle = self._by_key[key, stream] = self.handles[group].options(multiplexed_model_id=key,
                                                                              stream=stream)
        return handle

    def replicas(self) -> dict[str, list[str]]:
        """Group -> ids of the replicas Serve routes to now."""
        from utils.cluster.router import replica_ids  # deferred: ray
        return {name: replica_ids(self.app(name)) for name in self.handles}

    def each_replica(self, method: str, *args, group: str | None = None, timeout: float | None = None,
                     **kwargs) -> dict[str, tuple]:
        """One call per replica (of `group`, else of every group), concurrently: replica id -> its
        envelope; ("timeout", reason) for one that did not answer in `timeout` (default call_timeout);
        ("unavailable", reason) for one that died or failed: one replica never fails the whole answer."""
        timeout = timeout or self.settings.ray.call_timeout
        calls: dict[str, Any] = {}
        out: dict[str, tuple] = {}
        for name, ids in self.replicas().items():
            for rid in ids if group is None or name == group else ():
                try:
                    calls[rid] = getattr(self.handles[name], method).remote(*args, replica_id=rid, **kwargs)
                except Exception as exc:
                    out[rid] = _failed(rid, method, exc)
        deadline = time.monotonic() + timeout
        for rid, response in calls.items():
            try:
                with ray_errors(f"replica {rid}"):
                    try:
                        outcome = response.result(timeout_s=max(0.1, deadline - time.monotonic()))
                    except TimeoutError:
                        outcome = ("timeout", f"replica {rid} did not answer {method} in {timeout:g} s")
            except Exception as exc:
                outcome = _failed(rid, method, exc)
            if outcome[0] != "elsewhere":
                out[rid] = outcome
        return out

    def statuses(self, stale_ok: bool = False) -> dict[str, dict]:
        """Replica id -> what it reports (pid, node, GPUs, models, memory); unavailable ones say so.
        One fan-out serves every caller for STATUS_TTL (callers meanwhile wait for it and share it).
        stale_ok: the last answer now, never a wait (liveness); a refresh starts in the background."""
        if stale_ok:
            if time.monotonic() - self._status_at > STATUS_TTL and not self._status_lock.locked():
                threading.Thread(target=self.statuses, name="replica-status", daemon=True).start()
            return self._statuses
        with self._status_lock:
            if time.monotonic() - self._status_at > STATUS_TTL:
                self._statuses = {rid: value if kind == "ok" else {"replica": rid, "unavailable": value}
                                  for rid, (kind, value) in self.each_replica("status").items()}
                self._status_at = time.monotonic()
            return self._statuses

    def forget_statuses(self) -> None:
        """After an admin action: the next read asks the replicas again."""
        self._status_at = float("-inf")

    def replicas_status(self) -> dict:
        """/admin/model_status's `replicas`: per replica its pid and models; per model its replicas."""
        statuses = self.statuses()
        holders: dict[str, list[str]] = {}
        replicas = {}
        for rid, status in statuses.items():
            models = status.get("models", {})
            loaded = [k for k, v in models.items() if v["loaded"]]
            for key in loaded:
                holders.setdefault(key, []).append(rid)
            replicas[rid] = {k: status.get(k) for k in ("group", "pid", "node", "gpu_ids", "unavailable")}
            replicas[rid].update(loaded_models=loaded,
                                 loads={k: v["load_count"] for k, v in models.items() if v["load_count"]},
                                 models={k: {f: v[f] for f in ("state", "device", "in_flight", "load_count",
                                                               "unload_count", "bytes_in_memory", "error")}
                                         for k, v in models.items() if v["loaded"] or v["load_count"] or v["error"]})
        return {"count": len(replicas), "by_replica": replicas, "by_model": holders}

    def memory_status(self) -> dict:
        return {rid: status.get("memory", status) for rid, status in self.statuses().items()}


def _failed(rid: str, method: str, exc: BaseException) -> tuple:
    if isinstance(exc, ServerError):
        return "unavailable", exc.details
    log.error("%s of replica %s failed", method, rid, exc_info=exc)  # a bug of ours: logged, contained
    return "unavailable", f"{method} failed: {type(exc).__name__}"


def for_replicas(settings: Any) -> Any:
    """What a replica gets: no tokens (it serves no HTTP), and of the environment only what
    load_settings reads, never the front's secrets."""
    return settings.replace(admin_token=None, api_token=None, env=settings_env(settings.env or {}))


class ClusterManager:
    """The model manager's interface over every replica's manager (the front holds no model)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.settings = cluster.settings

    @property
    def keys(self) -> list[str]:
        return list(self.settings.models)

    def spec(self, key: str):
        if key not in self.settings.models:
            raise UnknownModel(f"no model named '{key}'; available: {', '.join(self.keys)}")
        return self.settings.models[key]

    def specs(self) -> dict:
        return dict(self.settings.models)

    def snapshot(self, stale_ok: bool = False) -> dict[str, dict]:
        """Every model as one process would show it, summed over replicas: loaded where any replica
        holds it; counts added; `replicas` names the holders. stale_ok: see Cluster.statuses."""
        statuses = [s for s in self.cluster.statuses(stale_ok).values() if "models" in s]
        out = {}
        for key in self.settings.models:
            views = [(s["replica"], s["models"][key]) for s in statuses if key in s["models"]]
            out[key] = _merge(key, self.settings.models[key], views)
        return out

    def snapshot_one(self, key: str) -> dict:
        self.spec(key)
        return self.snapshot()[key]

    def loaded_bytes(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for status in self.cluster.statuses().values():
            for device, value in status.get("loaded_bytes", {}).items():
                name = f"{status['replica']}/{device}" if device != "cpu" else "cpu"  # each replica's cuda:0
                total[name] = total.get(name, 0) + value
        return total

    def pressure_status(self) -> dict:
        """The local shape (device -> events), each replica's devices named `replica/device`."""
        return {f"{rid}/{device}": event for rid, s in self.cluster.statuses().items()
                for device, event in (s.get("pressure") or {}).items()}

    def ram_tier_status(self, reading: Any = None) -> dict:
        """The local shape, summed over replicas (each parks its GPU models in its host's RAM);
        each replica's own is in /admin/memory_status `replicas` and /metrics."""
        tier = self.settings.ram_tier
        tiers = [t for s in self.cluster.statuses().values() if (t := (s.get("memory") or {}).get("ram_tier"))]
        return {"enabled": tier.enabled, "pin_memory": tier.pin_memory, "keep_alive": tier.keep_alive,
                "budget": sum(t["budget"] for t in tiers), "used": sum(t["used"] for t in tiers),
                "models": sorted({k for t in tiers for k in t["models"]})}

    def load(self, key: str, *, force_retry: bool = True, device: str | None = None, wait: float = 0.0) -> dict:
        """On every replica of the model's group; the first replica's error (e.g. 503) is the answer."""
        self.spec(key)
        self._all("admin", "load", key, device=device, wait=wait, group=self.settings.ray.group_of(key).name,
                  timeout=self._load_timeout(wait), loading=True)
        return self.snapshot_one(key)

    def unload(self, key: str, *, wait: float = 0.0, reason: str = "admin") -> bool:
        self.spec(key)
        return any(self._all("admin", "unload", key, wait=wait, group=self.settings.ray.group_of(key).name,
                             timeout=self._load_timeout(wait), loading=True).values())

    def _load_timeout(self, wait: float) -> float:
        """A load (or the unload that waits for one) may take minutes: not a dead replica."""
        return self.settings.ray.call_timeout + wait + LOAD_ALLOWANCE

    def unload_idle(self, *, reason: str = "cleanup") -> list[str]:
        return sorted({k for keys in self._all("admin", "cleanup").values() for k in keys})

    def reconfigure(self, settings: Any) -> dict:
        old = self.settings
        self.settings = self.cluster.settings = settings.replace(ray=old.ray)  # placement changes need a restart
        self._all("admin", "reconfigure", settings=for_replicas(settings))
        return {"added": [k for k in settings.models if k not in old.models],
                "removed": [k for k in old.models if k not in settings.models],
                "changed": [k for k in settings.models if k in old.models and settings.models[k] != old.models[k]],
                "reload_when_idle": []}

    def _all(self, method: str, *args, loading: bool = False, **kwargs) -> dict[str, Any]:
        """loading (a load / unload): a replica that outlived the timeout is still loading, not gone;
        and no replica answering is a 503, not a silent success."""
        results = {}
        try:
            outcomes = self.cluster.each_replica(method, *args, **kwargs)
        finally:
            self.cluster.forget_statuses()
        for rid, outcome in outcomes.items():
            if outcome[0] == "timeout" and loading:
                raise StillLoading(f"{outcome[1]}; it is still at it, retry shortly", retry_after=RETRY_AFTER)
            if outcome[0] in ("unavailable", "timeout"):
                raise ReplicaUnavailable(f"replica {rid}: {outcome[1]}", retry_after=RETRY_AFTER)
            results[rid] = unwrap(outcome)
        if loading and not results:
            raise ReplicaUnavailable("no replica answered; they are starting or being replaced, retry shortly",
                                     retry_after=RETRY_AFTER)
        return results

    # the sweeper's and the lifecycle's calls: each replica sweeps and preloads on its own
    def expire_idle(self) -> list[str]:
        return []

    def relieve_pressure(self) -> list[str]:
        return []

    def preload(self) -> None:
        for key, spec in self.settings.models.items():
            if spec.preload:
                try:
                    self.load(key)
                except Exception as exc:
                    log.warning("preload of %s failed: %s", key, exc)

    def shutdown(self) -> None:
        self.cluster.stop()


def _merge(key: str, spec: Any, views: list[tuple[str, dict]]) -> dict:
    loaded = [(rid, v) for rid, v in views if v["loaded"]]
    errored = [(rid, v) for rid, v in views if v.get("error")]  # a failed load / backoff must show
    shown = loaded or errored or views
    base = dict(shown[0][1] if shown else ({
        "key": key, "family": spec.family, "repo_id": spec.repo_id, "state": "unloaded", "loaded": False,
        "device": None, "placement": {}, "bytes_in_memory": 0, "in_flight": 0, "error": None, "failures": 0}))
    for name in ("load_count", "unload_count", "in_flight", "bytes_in_memory", "failures"):
        base[name] = sum(v.get(name) or 0 for _, v in views)
    base["load_seconds_total"] = round(sum(v.get("load_seconds_total") or 0 for _, v in views), 4)
    base["loaded"] = bool(loaded)
    base["replicas"] = [rid for rid, _ in loaded]
    base.pop("engine", None)
    return base


class RayInference(InferenceService):
    """The local service's validation and media decoding (on the front), then the part that needs
    the model on a replica that holds it (or will load it), through the Serve handle."""

    def __init__(self, cluster: Cluster, manager: ClusterManager, media_limits: Any,
                 on_result: Callable | None = None, fetch: Callable | None = None) -> None:
        super().__init__(manager, media_limits, on_result=on_result, fetch=fetch)
        self.cluster = cluster

    # `track` (a job's live progress) needs the engine job, which stays in the replica: through Ray a
    # job shows its state but no step count. Cancelling (is_gone) works.
    def execute(self, key, request, job, deadline, is_gone=None, track=None) -> GenerationResult:
        response = self.cluster.handle(key).generate.remote(key, request, _without_media(job), deadline)
        return self._wait(key, response, deadline, is_gone)

    def execute_choices(self, key, requests, jobs, n, deadline, is_gone=None) -> list[GenerationResult]:
        """Each choice is its own call to a replica (they batch there as any concurrent requests do)."""
        calls = [(request, dataclasses.replace(job, params=choice_params(job.params, i)))
                 for request, job in zip(requests, jobs) for i in range(n)]
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            return list(pool.map(lambda call: self.execute(key, call[0], call[1], deadline, is_gone), calls))

    def stream_choices(self, key, jobs, n):
        raise InvalidInput("streaming several choices (n > 1 or a list of prompts) is not served through the Ray "
                           "backend; send stream: false, or one choice per request", field="n",
                           error="unsupported parameter")

    def execute_images(self, key, request, params, deadline, keep_alive, is_gone=None, track=None) -> dict:
        response = self.cluster.handle(key).images.remote(key, request, params, deadline, keep_alive)
        return self._wait(key, response, deadline, is_gone)

    def open_stream(self, key, request, job, deadline, on_result=None) -> "RemoteStream":
        """Waits for the replica's first envelope as long as `_wait` would (a queue, a slow load),
        never longer: Serve's generator has no timeout of its own, so a thread takes the `next`."""
        with ray_errors(f"'{key}'"):
            generator = self.cluster.handle(key, stream=True).stream.remote(key, request, _without_media(job),
                                                                             deadline)
            first: Future = Future()
            threading.Thread(target=_fill, args=(first, next, generator), name="stream-open", daemon=True).start()
            try:
                kind, value = first.result(timeout=self._limit(key, deadline) - time.monotonic())
            except TimeoutError:
                generator.cancel()
                raise RequestTimeout(f"'{key}': the stream did not start in time") from None
        if kind == "error":
            raise value
        return RemoteStream(key, generator, value, on_result)

    def _limit(self, key: str, deadline: float) -> float:
        return time.monotonic() + deadline + self.spec(key).engine.queue_timeout + LOAD_ALLOWANCE

    def _wait(self, key: str, response: Any, deadline: float, is_gone) -> Any:
        limit = self._limit(key, deadline)
        with ray_errors(f"'{key}'"):
            while True:
                try:
                    return unwrap(response.result(timeout_s=POLL_SECONDS))
                except TimeoutError:
                    if is_gone is not None and is_gone():
                        response.cancel()
                        return GenerationResult(text="", prompt_tokens=0, completion_tokens=0,
                                                finish_reason="cancelled")
                    if time.monotonic() > limit:
                        response.cancel()
                        raise


def _without_media(job: Any) -> Any:
    """The replica needs the decoded request, not the upload it came from (base64 or bytes again)."""
    return dataclasses.replace(job, media=[]) if getattr(job, "media", None) else job


def _fill(future: Future, fn: Callable, *args) -> None:
    try:
        future.set_result(fn(*args))
    except BaseException as exc:
        future.set_exception(exc)


class RemoteStream:
    """A replica's stream as the routes use a LeasedStream: iterate the text pieces; `result` once
    they ran out; `close` (a client gone) cancels the replica's generator, which cancels the row.

    Finished means the replica's generator ended (ran out, or raised); only then is there nothing to
    cancel. A client that leaves closes the nested generators first (GeneratorExit here), then calls
    `close`: both cancel unless finished, as LeasedStream does."""

    def __init__(self, key: str, generator: Any, device: str | None, on_result: Callable | None) -> None:
        self.key, self._generator, self.device, self._on_result = key, generator, device, on_result
        self.result: GenerationResult | None = None
        self._finished = False
        self._cancelled = False

    def __iter__(self) -> Iterator[str]:
        try:
            with ray_errors(f"'{self.key}'"):
                for kind, value in self._generator:
                    if kind == "piece":
                        yield value
                    elif kind == "end":
                        self.result = value
                    elif kind == "error":
                        raise value
            self._finished = True
        except GeneratorExit:
            raise
        except BaseException:
            self._finished = True
            raise
        finally:
            if not self._finished:
                self.close()
        if self.result is not None and self.result.finish_reason != "cancelled" and self._on_result:
            self._on_result(self.result)

    def close(self) -> None:
        if self._finished or self._cancelled:
            return
        self._cancelled = True
        try:
            self._generator.cancel()
        except Exception:
            log.exception("cancelling the stream of %s failed", self.key)
