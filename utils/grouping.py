"""Grouping by demand: whether a load that needs an idle resident model's room must wait for it.

Waiting requests are served grouped by model (A B A A C is served A A A B C): while requests for a
resident model keep coming, a load that needs its room passes it over, so those requests are served
before it goes instead of each paying for a reload moments later. What spares a model is demand,
never the mere fact that it served recently:
- serving or queued requests hold leases: such a model is no candidate at all (the manager);
- arriving requests: the recent gap between its requests while it was resident (an exponentially
  weighted mean of the last few gaps between two arrivals that both found it loaded) is shorter than
  its last load took (a reload would cost more than waiting for the next request), and the silence
  since its last request is no longer than SILENCE_GAPS such gaps (they keep coming) nor than that load.
  Waiting pays off exactly then: with requests every g seconds, waiting up to w costs the loader at
  most ~g of idle time per request it saves from a reload of L seconds.
One client switching from A to B has no request for A left, and none of its A requests found A
loaded (each one reloaded it): A shows no demand and goes at once, B's load never waits. (An
automatic window of "the model's own load time after it served" made every such switch wait that
long: 8.8 s instead of 0.5 s for a 0.6B model after an 8-bit one.)

`server.group_window` (GROUP_WINDOW) overrides the demand rule with a fixed window: a model that
served within that many seconds is spared whatever its demand; 0 turns grouping off. Either way
`max_pass_over` bounds how long one load is passed over.

Pure functions on numbers: the manager owns the records (under its lock) and the clock.
"""
from __future__ import annotations

from dataclasses import dataclass

# Weight of the newest gap in the mean: about the last three gaps count.
GAP_WEIGHT = 0.5
# The arrivals have stopped once the model has been silent for this many of its recent gaps.
SILENCE_GAPS = 2.0
# A gap longer than this many reloads reads the same as any long one ("slower than a reload"); the
# cap keeps one idle hour from hiding a burst that follows it for many arrivals.
GAP_CAP_RELOADS = 2.0


@dataclass
class Arrivals:
    """When requests for one model arrived: the last one, and the recent mean gap between requests
    while it was resident."""
    last: float | None = None
    gap: float | None = None     # exponentially weighted mean; None until two requests in a row found it loaded
    resident: bool = False       # the last request found it loaded, and it has not left since

    def record(self, now: float, resident: bool, reload_seconds: float | None = None) -> None:
        """A request arrived; `resident`: the model was loaded when it came."""
        if resident and self.resident and self.last is not None:
            sample = max(0.0, now - self.last)
            if reload_seconds:
                sample = min(sample, GAP_CAP_RELOADS * reload_seconds)
            self.gap = sample if self.gap is None else (1 - GAP_WEIGHT) * self.gap + GAP_WEIGHT * sample
        self.last, self.resident = now, resident

    def left(self) -> None:
        """The model was unloaded: a gap across its absence and reload says nothing about demand."""
        self.resident = False


def spare_reason(arrivals: Arrivals, last_used: float | None, reload_seconds: float | None, now: float,
                 window: float | None) -> str | None:
    """Why an idle resident model should stay for now (a short sentence for the log), or None when a
    load may evict it. `window` is the GROUP_WINDOW override (None: by demand)."""
    if window is not None:
        if window > 0 and last_used is not None and now - last_used < window:
            return f"served {now - last_used:.2f}s ago, within GROUP_WINDOW={window:g}s"
        return None
    if arrivals.gap is None or arrivals.last is None or not reload_seconds:
        return None  # fewer than two requests, or nothing known about its reload: no demand shown
    silence = now - arrivals.last
    if arrivals.gap < reload_seconds and silence < min(reload_seconds, SILENCE_GAPS * arrivals.gap):
        return (f"its requests arrive every {arrivals.gap:.2f}s (last {silence:.2f}s ago), a reload takes "
                f"{reload_seconds:.2f}s")
    return None
