"""Per-replica series for /metrics (backend ray), read from every replica's status at scrape time:
  replica_up{replica,group}                    gauge 1 (0: it did not answer)
  replica_process_rss_bytes{replica}           gauge
  replica_model_loaded{replica,model}          gauge 0/1
  replica_model_loads{replica,model}           gauge: loads so far on that replica (since it started)
  replica_requests_in_flight{replica,model}    gauge
  replica_ram_tier_bytes{replica}              gauge: bytes of GPU models that replica parked in RAM
  replica_ram_tier_budget_bytes{replica}       gauge
(the unlabelled ram_tier_* series of utils/ops/metrics.py are their sums)
"""
from __future__ import annotations

import logging
from typing import Iterable

from prometheus_client.core import GaugeMetricFamily

from utils.ops.metrics import PREFIX

log = logging.getLogger("model_server.metrics")


class ReplicaCollector:
    def __init__(self, cluster) -> None:
        self.cluster = cluster

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            statuses = self.cluster.statuses()
        except Exception:
            log.exception("reading the replicas' status for /metrics failed")
            return
        up = GaugeMetricFamily(PREFIX + "replica_up", "1 when the replica answered", labels=["replica", "group"])
        rss = GaugeMetricFamily(PREFIX + "replica_process_rss_bytes", "Resident memory of the replica's process",
                                labels=["replica"])
        loaded = GaugeMetricFamily(PREFIX + "replica_model_loaded", "1 when the replica holds the model",
                                   labels=["replica", "model"])
        loads = GaugeMetricFamily(PREFIX + "replica_model_loads", "Loads of the model on the replica so far",
                                  labels=["replica", "model"])
        in_flight = GaugeMetricFamily(PREFIX + "replica_requests_in_flight", "Requests holding the model there",
                                      labels=["replica", "model"])
        tier_used = GaugeMetricFamily(PREFIX + "replica_ram_tier_bytes",
                                      "Bytes of GPU models the replica parked in RAM", labels=["replica"])
        tier_budget = GaugeMetricFamily(PREFIX + "replica_ram_tier_budget_bytes",
                                        "Bytes the replica's RAM tier may hold", labels=["replica"])
        for rid, status in statuses.items():
            up.add_metric([rid, status.get("group") or ""], 0 if "unavailable" in status else 1)
            memory = status.get("memory") or {}
            if memory:
                rss.add_metric([rid], memory["ram"]["process_rss"])
                if memory.get("ram_tier"):
                    tier_used.add_metric([rid], memory["ram_tier"]["used"])
                    tier_budget.add_metric([rid], memory["ram_tier"]["budget"])
            for key, info in (status.get("models") or {}).items():
                loaded.add_metric([rid, key], 1 if info["loaded"] else 0)
                loads.add_metric([rid, key], info["load_count"])
                in_flight.add_metric([rid, key], info["in_flight"])
        yield from (up, rss, loaded, loads, in_flight, tier_used, tier_budget)
