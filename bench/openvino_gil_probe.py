"""Does openvino-genai's ContinuousBatchingPipeline.step() release the GIL? (issue 28, the c=8 gap)

Steps 8 greedy requests (32-token prompt, 64 new tokens) on an existing export twice: alone, then beside a
pure-Python thread that counts as fast as it can. If step() held the GIL the counter would barely move
while stepping; it counting millions means Python threads (our HTTP side) run during step(), so the GIL is
not what keeps ours below bare openvino-genai. The wall times compare CPU contention, not the GIL: on a
shared 2-core box they are noisy (run under `flock /tmp/heavy.lock`).

usage: python bench/openvino_gil_probe.py EXPORT_FOLDER
"""
import json
import sys
import threading
import time

import numpy
import openvino
import openvino_genai


def main(folder: str) -> None:
    scheduler = openvino_genai.SchedulerConfig()
    scheduler.max_num_seqs, scheduler.cache_size, scheduler.enable_prefix_caching = 16, 0, False
    pipe = openvino_genai.ContinuousBatchingPipeline(folder, scheduler, "CPU", {})
    prompt = openvino.Tensor(numpy.arange(100, 132, dtype=numpy.int64).reshape(1, -1))

    def config():
        cfg = openvino_genai.GenerationConfig()
        cfg.max_new_tokens, cfg.do_sample = 64, False
        return cfg

    def run(rows: int) -> dict:
        handles = [pipe.add_request(i, prompt, config()) for i in range(rows)]
        steps, in_step, started = 0, 0.0, time.perf_counter()
        while any(h.get_status() == openvino_genai.GenerationStatus.RUNNING for h in handles):
            before = time.perf_counter()
            pipe.step()
            in_step += time.perf_counter() - before
            steps += 1
            for h in handles:
                if h.can_read():
                    h.read()
        return {"steps": steps, "in_step_s": round(in_step, 3), "wall_s": round(time.perf_counter() - started, 3)}

    run(2)  # warm
    alone = run(8)
    stop, count = threading.Event(), [0]

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1
    thread = threading.Thread(target=spin)
    thread.start()
    beside = run(8)
    stop.set()
    thread.join()
    print(json.dumps({"alone": alone, "beside_spinning_thread": beside, "spins_during_steps": count[0]}))


if __name__ == "__main__":
    main(sys.argv[1])
