"""``pflat serve-scorer``: a causal LM behind a small JSON scoring API (the black box).

    pflat serve-scorer --model bundled-smollm2 --label_words terrible great --template "{text} It was" \\
        --host 127.0.0.1 --port 8765

The service runs a :class:`~pflat_lightning.black_box.scorers.HuggingFaceScorer` and offers nothing but
forward scores; :class:`~pflat_lightning.black_box.scorers.HTTPScorer` is its client.

API (JSON bodies, ``Content-Type: application/json``):

``GET /info`` -> ``200``::

    {"model": "bundled-smollm2", "hidden_size": 576, "embedding_std": 0.1356,
     "label_words": ["terrible", "great"], "num_labels": 2, "template": "{text} It was", "max_length": 128}

``POST /score`` with ``P`` prompts of ``T`` vectors of ``hidden_size`` numbers and ``B`` texts::

    {"prompts": [[[0.01, -0.2, ...], ...], ...], "texts": ["A gem of a film.", ...]}

-> ``200`` with the label-word logits of every (prompt, text) pair, shape ``(P, B, num_labels)``::

    {"logits": [[[-1.25, 0.5], ...], ...]}

Errors answer ``{"error": "<what was wrong, the value and what is allowed>"}`` with status ``400``
(a body that is not JSON, not an object, has missing or unknown keys, ``prompts`` that are not a
finite ``(P >= 1, T >= 1, hidden_size)`` array, ``texts`` that is not a list of strings), ``404`` (an
unknown path), ``411`` (no ``Content-Length``) or ``413`` (a body over ``--max_body_mb``). Requests
are scored one at a time. The service sees the texts in the clear: run it where the data may go.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from pflat_lightning.black_box.scorers import DEFAULT_TEMPLATE, HuggingFaceScorer, PromptScorer, check_request

REQUEST_KEYS = ("prompts", "texts")


def parse_score_request(body: bytes, scorer: PromptScorer) -> Tuple[torch.Tensor, list]:
    """The prompts and texts of a ``POST /score`` body, validated.

    Raises:
        ValueError: naming what is wrong, the value and what is allowed.
    """
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"The body must be JSON: {error}.") from None
    if not isinstance(request, dict):
        raise ValueError(f"The body must be a JSON object with keys {list(REQUEST_KEYS)}, got {type(request).__name__}.")
    missing = [k for k in REQUEST_KEYS if k not in request]
    unknown = sorted(set(request) - set(REQUEST_KEYS))
    if missing or unknown:
        raise ValueError(f"The body must have exactly the keys {list(REQUEST_KEYS)}; missing {missing}, unknown {unknown}.")
    hidden = scorer.info.hidden_size
    try:
        prompts = torch.tensor(request["prompts"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"prompts must be a nested list of numbers shaped (num_prompts, num_tokens, hidden_size={hidden}), got "
            f"{_abbreviate(request['prompts'])}."
        ) from None
    return check_request(prompts, request["texts"], scorer.info), request["texts"]


def _abbreviate(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def make_server(scorer: PromptScorer, host: str = "127.0.0.1", port: int = 0, *, max_body_bytes: int = 64 * 2**20
                ) -> ThreadingHTTPServer:
    """An HTTP server for ``scorer`` (not yet serving): ``server.serve_forever()`` in a thread, then
    ``server.shutdown()``; ``port=0`` takes a free port (``server.server_address[1]``)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/info":
                return self._reply(404, {"error": f"Unknown path {self.path!r}; the API has GET /info and POST /score."})
            self._reply(200, scorer.info.to_json())

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/score":
                return self._reply(404, {"error": f"Unknown path {self.path!r}; the API has GET /info and POST /score."})
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                return self._reply(411, {"error": f"Content-Length must be a byte count, got {length!r}."})
            if int(length) > max_body_bytes:
                self.close_connection = True
                return self._reply(413, {"error": f"The body has {length} bytes; at most {max_body_bytes} are allowed."})
            try:
                prompts, texts = parse_score_request(self.rfile.read(int(length)), scorer)
            except ValueError as error:
                return self._reply(400, {"error": str(error)})
            with lock:
                logits = scorer.label_logits(prompts, texts)
            self._reply(200, {"logits": logits.tolist()})

        def _reply(self, status: int, payload: Dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # keep request lines off stderr
            pass

    return ThreadingHTTPServer((host, port), Handler)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pflat serve-scorer", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="bundled name (bundled-smollm2), folder or hub id of a causal LM")
    parser.add_argument("--label_words", nargs="+", required=True, help="one single-token word per class")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="where the text goes; the label word follows")
    parser.add_argument("--max_length", type=int, default=128, help="most tokens of a filled template")
    parser.add_argument("--batch_size", type=int, default=32, help="(prompt, text) pairs per forward pass")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 takes a free port")
    parser.add_argument("--max_body_mb", type=float, default=64.0, help="largest request body accepted")
    return parser.parse_args(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM); prints ``Serving <model> on http://host:port``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}.")
        if not args.max_body_mb > 0:
            raise ValueError(f"--max_body_mb must be > 0, got {args.max_body_mb}.")
        scorer = HuggingFaceScorer(args.model, args.label_words, template=args.template, max_length=args.max_length,
                                   batch_size=args.batch_size)
        server = make_server(scorer, args.host, args.port, max_body_bytes=int(args.max_body_mb * 2**20))
    except (ValueError, OSError) as error:
        print(f"pflat serve-scorer: error: {error}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"Serving {args.model} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
