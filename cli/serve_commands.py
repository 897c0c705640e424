"""`ardeploy serve` (an OpenAI-compatible HTTP server) and `ardeploy triton` (a Triton model repository)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .errors import UserError
from .options import add_backend_threads, add_device, add_flavor, add_kv_budget, add_verbosity, run_options


def cmd_serve(args) -> int:
    try:
        from ardeploy.serve.engine import build_engine
        from ardeploy.serve.server import run_server
        from ardeploy.serve.service import ModelService
    except ImportError as e:
        raise UserError(f"ardeploy serve needs its extra packages ({e.name} is missing): "
                        f"pip install 'ardeploy[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is outside [0, 65535]")
    if args.max_queue < 1:
        raise UserError(f"--max-queue must be at least 1 (got {args.max_queue})")
    if args.drain_timeout < 0:
        raise UserError(f"--drain-timeout must be >= 0 (got {args.drain_timeout})")
    api_key = args.api_key if args.api_key is not None else os.environ.get("ARDEPLOY_API_KEY") or None
    generator, scheduler = build_engine(args.bundle, max_batch=args.max_batch, max_queue=args.max_queue,
                                        options=run_options(args), scheduler=args.scheduler,
                                        kv_budget=args.kv_budget)
    name = args.model_name or Path(args.bundle).resolve().name
    run_server(ModelService(generator, scheduler, name), host=args.host, port=args.port, api_key=api_key,
               drain_timeout=args.drain_timeout, access_log=args.verbose > 0)
    return 0


def cmd_triton(args) -> int:
    from ardeploy.serve.triton import write_repository
    model_dir = write_repository(args.bundle, args.out, name=args.name, instances=args.instances,
                                 max_batch=args.max_batch, device=args.device or "cpu", threads=args.threads,
                                 decoupled=args.decoupled, bundle_path=args.bundle_path,
                                 max_queue=args.max_queue, force=args.force)
    print(f"wrote Triton model {model_dir.name!r} to {model_dir} (backend python, "
          f"{'decoupled: streams tokens' if args.decoupled else 'one response per request'})")
    return 0


def register(sub) -> None:
    _register_serve(sub)
    _register_triton(sub)


def _register_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a bundle over an OpenAI-compatible HTTP API",
        description="Serve a text bundle over HTTP: /v1/models, /v1/completions and /v1/chat/completions "
                    "(OpenAI's API: streaming as server-sent events, temperature 0 = greedy, top_p, seed, stop, "
                    "max_tokens, response_format json_object / json_schema for structured output), /health "
                    "and /metrics (Prometheus). Malformed requests get OpenAI-style error JSON naming the field; a "
                    "full queue answers 429; a client that disconnects frees its row at the next step. SIGTERM "
                    "or Ctrl-C lets the requests in flight finish, then exits. Needs pip install 'ardeploy[serve]'.",
        epilog="example: ardeploy serve bundles/smollm2 --port 8000, then "
               "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-') from the openai package")
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port, printed at start)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="rows of the batch (requests run at once), at most the bundle's --max-batch (default: the "
                        "bundle's)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row; one more is answered 429 (default 64)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $ARDEPLOY_API_KEY, else no key)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the bundle folder's name)")
    p.add_argument("--scheduler", default="auto", choices=["auto", "batching", "sequential"],
                   help="auto (default): continuous batching (requests join the running batch between decode "
                        "steps) when --max-batch > 1 and the graph allows it, else one request at a time")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let requests in flight finish before cancelling them (default 30)")
    add_backend_threads(p)
    add_flavor(p)
    add_device(p)
    add_kv_budget(p)
    add_verbosity(p, "more detail (-v: one access-log line per request)")
    p.set_defaults(func=cmd_serve)


def _register_triton(sub) -> None:
    p = sub.add_parser(
        "triton", help="write a Triton Inference Server model repository that runs a bundle",
        description="Write (or add to) a Triton model repository: REPO/NAME/config.pbtxt and REPO/NAME/1/model.py, "
                    "a Python-backend model running the ardeploy runtime (decoupled: one response per token, "
                    "streamed over gRPC or HTTP generate_stream). The bundle is linked or copied into "
                    "REPO/NAME/1/bundle unless --bundle-path names where the server will find it. The server's "
                    "Python needs ardeploy installed (see docs/SERVING.md).")
    p.add_argument("bundle")
    p.add_argument("--out", required=True, help="model repository folder (created if missing)")
    p.add_argument("--force", action="store_true", help="replace a model of the same name in the repository")
    p.add_argument("--name", default=None, help="model name (default: the bundle folder's name)")
    p.add_argument("--instances", type=int, default=1, help="model instances Triton runs (each loads the weights)")
    p.add_argument("--max-batch", type=int, default=None, help="rows one instance runs at once (default: the bundle's)")
    p.add_argument("--max-queue", type=int, default=64, help="requests one instance lets wait")
    p.add_argument("--decoupled", action=argparse.BooleanOptionalAction, default=True,
                   help="stream one response per token (default); --no-decoupled: one response per request "
                        "(needed by Triton's HTTP infer endpoint)")
    p.add_argument("--bundle-path", default=None,
                   help="where the Triton server will find the bundle (a path on its machine or in its container); "
                        "nothing is copied")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime in each instance")
    add_device(p, cuda_graph=False)
    add_verbosity(p)
    p.set_defaults(func=cmd_triton)

