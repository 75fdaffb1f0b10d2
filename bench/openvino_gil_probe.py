"""Does openvino-genai's ContinuousBatchingPipeline.step() hold the GIL? (issue 28, the c=8 gap)

One thread steps 8 greedy requests (a 53-token prompt, 64 new tokens) again and again on an existing
export. Meanwhile another thread of the same process sleeps 1 ms at a time and records how late each
wake-up comes back (it needs the GIL to return), and a second process does the same (it needs only a
core). Both are measured alone first. A thread that wakes about a step late while the other process
wakes on time means step() holds the GIL: no request thread of a server runs while its OpenVINO engine
steps (utils/engine/arrivals.py is the answer to that).

The first version of this probe (session 4) counted how far a pure-Python thread got while stepping and
read "millions" as "released"; alone the same thread counts 6-7 times further, and its count came from
the gaps between steps.

usage: flock /tmp/heavy.lock .venv/bin/python bench/openvino_gil_probe.py EXPORT_FOLDER [--out FILE]
"""
import argparse
import json
import subprocess
import sys
import threading
import time

import numpy
import openvino
import openvino_genai

WAKES = 200
OTHER_PROCESS = f"""
import time
late = []
for _ in range({WAKES}):
    t = time.perf_counter(); time.sleep(0.001); late.append(time.perf_counter() - t - 0.001)
print(sorted(late)[len(late) // 2])
"""


def lateness_ms() -> float:
    """The median delay of a 1 ms sleep's return in this process, in ms."""
    late = []
    for _ in range(WAKES):
        started = time.perf_counter()
        time.sleep(0.001)
        late.append(time.perf_counter() - started - 0.001)
    return round(1000 * sorted(late)[len(late) // 2], 2)


def other_process_lateness_ms() -> float:
    done = subprocess.run([sys.executable, "-c", OTHER_PROCESS], capture_output=True, text=True, check=True)
    return round(1000 * float(done.stdout), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--out")
    args = parser.parse_args()
    scheduler = openvino_genai.SchedulerConfig()
    scheduler.max_num_seqs, scheduler.cache_size, scheduler.enable_prefix_caching = 16, 0, False
    pipe = openvino_genai.ContinuousBatchingPipeline(args.folder, scheduler, "CPU", {})
    prompt = openvino.Tensor(numpy.arange(100, 153, dtype=numpy.int64).reshape(1, -1))
    stop, steps = threading.Event(), []

    def stepper() -> None:
        request = 0
        while not stop.is_set():
            handles = []
            for _ in range(8):
                config = openvino_genai.GenerationConfig()
                config.max_new_tokens, config.do_sample = 64, False
                handles.append(pipe.add_request(request, prompt, config))
                request += 1
            while handles:
                started = time.perf_counter()
                pipe.step()
                steps.append(time.perf_counter() - started)
                handles = [h for h in handles if h.get_status() == openvino_genai.GenerationStatus.RUNNING]

    alone = {"this_process_ms": lateness_ms(), "other_process_ms": other_process_lateness_ms()}
    thread = threading.Thread(target=stepper)
    thread.start()
    time.sleep(2)  # past the first prefill
    stepping = {"this_process_ms": lateness_ms(), "other_process_ms": other_process_lateness_ms()}
    stop.set()
    thread.join()
    result = {"median_late_wake_alone": alone, "median_late_wake_while_stepping": stepping,
              "median_step_ms": round(1000 * sorted(steps)[len(steps) // 2], 1),
              "step_holds_gil": stepping["this_process_ms"] > 0.5 * 1000 * sorted(steps)[len(steps) // 2]}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as out:
            out.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
