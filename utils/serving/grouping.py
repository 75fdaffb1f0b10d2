"""Grouping by demand: whether a load that needs an idle resident model's room must wait for it.

Waiting requests are served grouped by model (A B A A C is served A A A B C): while requests for a
resident model may still come, a load that needs its room passes it over, so they are served before
it goes instead of each paying for a reload moments later. What spares a model is demand, never the
mere fact that it served recently. An idle model A is spared for the load of another only while
both hold:
- A was asked for recently: its last request came (or ended) less than one reload of A ago (waiting
  longer would cost more than the reload it may save);
- someone can still ask for it: a request is being served right now (a lease on any model), or a
  client is between two requests (fewer requests are in the server than at its peak during the last
  reload of A: clients just answered, on their way back with their next request). When every
  request in the server waits for a load, or none is left, waiting for A serves nobody.
(Serving and queued requests of A itself hold leases: such a model is no candidate at all.)
One client switching from A to B has nothing in the server but its request for B, and never had
more than one: A goes at once and B's load never waits. (An automatic window of "the model's own
load time after it served" made every such switch wait that long: 8.8 s instead of 0.5 s for a
0.6B model after an 8-bit one.)

Why not "A's requests arrive faster than A reloads": under concurrent mixed load (bench/churn.py,
8 clients over five models, two slots) a model's requests come 1-2 s apart against reloads of
0.3-0.5 s, yet the clients a model's burst just answered come straight back and a fifth of them want
it again; sparing by that rate gave 30 loads per 100 requests, as many as no grouping (31). The gap
is still measured (an exponentially weighted mean that skips gaps across a time the model was not
loaded) and shown in the status.

`server.group_window` (GROUP_WINDOW) overrides the demand rule with a fixed window: a model that
served within that many seconds is spared whatever its demand; 0 turns grouping off. Either way
`max_pass_over` bounds how long one load is passed over.

Pure functions on numbers: the manager owns the records (under its lock) and the clock.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Weight of the newest gap in the mean shown in the status: about the last three gaps count.
GAP_WEIGHT = 0.5


@dataclass
class Arrivals:
    """When requests for one model arrived: the last one, how many came during its current stay
    (since it was last unloaded), and the recent mean gap between them."""
    last: float | None = None
    gap: float | None = None     # exponentially weighted mean of gaps within stays; None before the first
    in_stay: int = 0             # requests since the model was last unloaded
    stayed: bool = False         # no unload since the last request

    def record(self, now: float) -> None:
        if self.stayed and self.last is not None:
            sample = max(0.0, now - self.last)
            self.gap = sample if self.gap is None else (1 - GAP_WEIGHT) * self.gap + GAP_WEIGHT * sample
        self.in_stay = self.in_stay + 1 if self.stayed else 1
        self.last, self.stayed = now, True

    def left(self) -> None:
        """The model was unloaded: the next gap spans its absence (the other models' time)."""
        self.stayed = False


@dataclass
class InFlight:
    """Requests in the server (waiting for a lease or holding one) and their recent peak."""
    count: int = 0
    changes: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, count after the change)

    def change(self, now: float, delta: int) -> None:
        self.count += delta
        self.changes.append((now, self.count))

    def away(self, now: float, window: float) -> int:
        """Clients between two requests: the peak of the last `window` seconds minus those in now."""
        peak = self.count
        for at, count in reversed(self.changes):
            if at < now - window:
                break
            peak = max(peak, count)
        return peak - self.count


def spare_reason(arrivals: Arrivals, last_used: float | None, reload_seconds: float | None, now: float,
                 window: float | None, could_ask: int) -> str | None:
    """Why an idle resident model should stay for now (a short sentence for the log), or None when a
    load may evict it. `window`: the GROUP_WINDOW override (None: by demand); `could_ask`: clients
    that may ask for it next (requests being served, clients between two requests)."""
    if window is not None:
        if window > 0 and last_used is not None and now - last_used < window:
            return f"served {now - last_used:.2f}s ago, within GROUP_WINDOW={window:g}s"
        return None
    if not could_ask or arrivals.last is None or not reload_seconds:
        return None
    silence = now - max(arrivals.last, last_used if last_used is not None else arrivals.last)
    if silence < reload_seconds:
        gap = f", every {arrivals.gap:.2f}s" if arrivals.gap is not None and arrivals.in_stay > 1 else ""
        return (f"asked {silence:.2f}s ago ({arrivals.in_stay} request(s) since it loaded{gap}); a reload takes "
                f"{reload_seconds:.2f}s; {could_ask} client(s) may ask next")
    return None
