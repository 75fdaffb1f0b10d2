"""The HTTP side both bare loops share (bench/bare_loop.py, bench/bare_loop_split.py): Flask's
/health and a /v1/chat/completions that hands the body to the loop's `submit` and answers its ids."""
import time
from typing import Any, Callable

from flask import Flask, jsonify, request


def make_app(tokenizer: Any, submit: Callable[[dict], Any]) -> Flask:
    """`submit(body)` waits for the loop and returns the new token ids, or (text, token count)."""
    app = Flask(__name__)

    @app.get("/health")
    def health():
        return "ok"

    @app.post("/v1/chat/completions")
    def chat():
        body = request.get_json()
        out = submit(body)
        text, count = out if isinstance(out, tuple) else (tokenizer.decode(out, skip_special_tokens=True), len(out))
        return jsonify({"id": "bare", "object": "chat.completion", "created": int(time.time()),
                        "model": body.get("model"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "length"}],
                        "usage": {"completion_tokens": count}})

    return app
