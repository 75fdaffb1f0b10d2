"""backend ray: the services of the Flask front, whose models run in Ray Serve replicas."""
from __future__ import annotations

from dataclasses import asdict

from utils.cluster.front import Cluster, ClusterManager, RayInference
from utils.cluster.metrics import ReplicaCollector
from utils.config.settings import ServerSettings
from utils.local_services import Services, temp_manager
from utils.media.decode import MediaLimits
from utils.media.remote import RemoteFetcher
from utils.ops.metrics import Metrics
from utils.serving.memory import MemoryProbe


def build_cluster_services(settings: ServerSettings) -> Services:
    """backend ray: the front validates, decodes media and keeps temp files; the models, their
    manager and engines live in Ray Serve replicas (utils/cluster/). Started here, in the gunicorn
    worker (after the fork), never in the arbiter."""
    cluster = Cluster(settings).start()
    probe, metrics = MemoryProbe(gpus=False), Metrics()  # the front holds no model: no CUDA context here
    manager = ClusterManager(cluster)
    temp = temp_manager(settings)
    metrics.watch(manager=manager, probe=probe, temp=temp)
    metrics.registry.register(ReplicaCollector(cluster))
    inference = RayInference(cluster, manager, MediaLimits(**asdict(settings.media)), on_result=metrics.on_result,
                             fetch=RemoteFetcher(settings.remote_media).fetch)
    return Services(settings=settings, manager=manager, inference=inference, temp=temp, probe=probe,
                    metrics=metrics, cluster=cluster)
