"""Grouping by demand: whether a load that needs an idle resident model's room must wait for it.

Waiting requests are served grouped by model (A B A A C is served A A A B C): while requests for a
resident model keep coming, a load that needs its room passes it over, so they are served before it
goes instead of each paying for a reload moments later. What spares a model is demand, never the
mere fact that it served recently. An idle model A is spared for the load of another only while
all of these hold:
- its requests arrive faster than it reloads: the recent gap between them (an exponentially weighted
  mean of the last few gaps; a gap across a time A was not loaded says nothing about A and is
  skipped) is shorter than A's last load took;
- they have not stopped: A's last request came (or ended) less than a reload ago;
- someone can still send one: a request is being served right now (a lease on any model). When every
  request in the server waits for a load (or none is left), waiting for A serves nobody.
(Serving and queued requests of A itself hold leases: such a model is no candidate at all.)
One client switching from A to B has nothing in flight but its request for B, so A goes at once and
B's load never waits. (An automatic window of "the model's own load time after it served" made every
such switch wait that long: 8.8 s instead of 0.5 s for a 0.6B model after an 8-bit one.)

`server.group_window` (GROUP_WINDOW) overrides the demand rule with a fixed window: a model that
served within that many seconds is spared whatever its demand; 0 turns grouping off. Either way
`max_pass_over` bounds how long one load is passed over.

Pure functions on numbers: the manager owns the records (under its lock) and the clock.
"""
from __future__ import annotations

from dataclasses import dataclass

# Weight of the newest gap in the mean: about the last three gaps count.
GAP_WEIGHT = 0.5
# A gap longer than this many reloads reads the same as any long one ("slower than a reload"); the
# cap keeps one idle hour from hiding a burst that follows it for many arrivals.
GAP_CAP_RELOADS = 2.0


@dataclass
class Arrivals:
    """When requests for one model arrived: the last one, and the recent mean gap between them while
    the model did not leave."""
    last: float | None = None
    gap: float | None = None     # exponentially weighted mean; None until two requests came within one stay
    stayed: bool = False         # no unload since the last request

    def record(self, now: float, reload_seconds: float | None = None) -> None:
        if self.stayed and self.last is not None:
            sample = max(0.0, now - self.last)
            if reload_seconds:
                sample = min(sample, GAP_CAP_RELOADS * reload_seconds)
            self.gap = sample if self.gap is None else (1 - GAP_WEIGHT) * self.gap + GAP_WEIGHT * sample
        self.last, self.stayed = now, True

    def left(self) -> None:
        """The model was unloaded: the next gap spans its absence (the other models' time)."""
        self.stayed = False


def spare_reason(arrivals: Arrivals, last_used: float | None, reload_seconds: float | None, now: float,
                 window: float | None, serving: int) -> str | None:
    """Why an idle resident model should stay for now (a short sentence for the log), or None when a
    load may evict it. `window`: the GROUP_WINDOW override (None: by demand); `serving`: requests
    being served in the server (leases held), which could be followed by one for this model."""
    if window is not None:
        if window > 0 and last_used is not None and now - last_used < window:
            return f"served {now - last_used:.2f}s ago, within GROUP_WINDOW={window:g}s"
        return None
    if not serving or arrivals.gap is None or arrivals.last is None or not reload_seconds:
        return None
    silence = now - max(arrivals.last, last_used if last_used is not None else arrivals.last)
    if arrivals.gap < reload_seconds and silence < reload_seconds:
        return (f"its requests arrive every {arrivals.gap:.2f}s (last {silence:.2f}s ago), a reload takes "
                f"{reload_seconds:.2f}s, {serving} request(s) being served")
    return None
