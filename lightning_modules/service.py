"""``semconv serve``: the online lookup service over a published top-K cache (FastAPI on uvicorn).

Routes (read-only)::

    GET  /v1/users/{user_id}/recommendations?k=10
         -> {"user", "items": [{"item", "title", "score"}], "version", "fallback"}
    GET  /v1/version                                -> the published version's record
    GET  /healthz                                   -> {"status": "ok", "version"}
    POST /v1/recommendations {"history": [...], "k": 10}  -> live beam search (needs --model), else 501

An unknown user gets the version's popular fallback with ``"fallback": true``. Every error is a JSON
``{"error": message}`` with a 4xx code (422 for a bad ``k``, naming the limit); no route answers with a stack
trace. With ``SEMCONV_API_KEY`` set (or ``api_key`` given) every request must send it as ``X-API-Key``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import Response

from datamodules.errors import SemConvError
from datamodules.recommendation_store import KOutOfRange, RecommendationStore, StoreError, artifact_hashes, open_store

log = logging.getLogger(__name__)

#: ``live_recommender(history, k) -> (items, scores)``: item ids (original, strings) best first.
LiveRecommender = Callable[[Sequence[str], int], tuple[Sequence[str], Sequence[float]]]
MAX_USER_ID = 256
API_KEY_ENV = "SEMCONV_API_KEY"


def _json(payload, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")).encode(), status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def create_app(
    store: RecommendationStore, live_recommender: LiveRecommender | None = None, api_key: str | None = None
) -> FastAPI:
    """The lookup service over ``store``.

    Args:
        store: an opened store; it must hold a published version.
        live_recommender: the live path for ``POST /v1/recommendations`` (None answers 501).
        api_key: required ``X-API-Key`` value; None reads ``SEMCONV_API_KEY`` (unset or empty: no key needed).

    Raises:
        StoreError: the store has no published version.
    """
    store.require_current()
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    app = FastAPI(title="semconv serve", docs_url=None, redoc_url=None, openapi_url=None)

    if api_key:
        expected = api_key.encode()

        @app.middleware("http")
        async def require_key(request: Request, call_next):
            given = request.headers.get("x-api-key", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(401, "missing or wrong X-API-Key header")
            return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error(exc.status_code, message.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return _error(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return _error(503 if isinstance(exc, StoreError) else 500, "the store could not answer; retry later")

    def items_payload(items, scores, version) -> list[dict]:
        titles = store.titles(version, items)
        return [
            {"item": item, "title": title, "score": score}
            for item, title, score in zip(items, titles, scores, strict=False)
        ]

    # async: a lookup is one short store read, cheaper inline than a thread-pool hop
    @app.get("/v1/users/{user_id}/recommendations")
    async def recommendations(user_id: str, request: Request) -> Response:
        if not 0 < len(user_id) <= MAX_USER_ID or not user_id.isprintable():
            return _error(422, f"user_id must be 1 to {MAX_USER_ID} printable characters")
        raw_k = request.query_params.get("k")
        try:
            k = int(raw_k) if raw_k is not None else min(10, store.require_current().k)  # 10, or all a smaller K
        except ValueError:
            return _error(422, f"k must be an integer between 1 and {store.require_current().k}; got {raw_k!r}")
        try:
            found = store.lookup(user_id, k)
        except KOutOfRange as err:
            return _error(422, str(err))
        return _json(
            {
                "user": user_id,
                "items": items_payload(found.items, found.scores, found.version),
                "version": found.version,
                "fallback": found.fallback,
            }
        )

    @app.get("/v1/version")
    async def version() -> Response:
        return _json(store.require_current().as_dict())

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok", "version": store.require_current().version})

    @app.post("/v1/recommendations")
    async def live(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, 'the body must be JSON: {"history": ["<item id>", ...], "k": 10}')
        history = body.get("history") if isinstance(body, dict) else None
        if not isinstance(history, list) or not history or not all(isinstance(i, (str, int)) for i in history):
            return _error(422, 'history must be a non-empty list of item ids: {"history": ["<item id>", ...]}')
        record = store.require_current()
        limit = getattr(live_recommender, "k", record.k)
        k = body.get("k", min(10, limit))
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limit:
            return _error(422, f"k must be an integer between 1 and {limit}; got {k!r}")
        if live_recommender is None:
            return _error(
                501, "live recommendations need a model: start `semconv serve --model <exported stage-3 dir>`"
            )
        try:  # the beam search blocks: off the event loop, so cached lookups keep being answered meanwhile
            items, scores = await run_in_threadpool(live_recommender, [str(item) for item in history], k)
        except SemConvError as err:  # an unknown item id (named), or k beyond the live path's K
            return _error(422, str(err))
        return _json(
            {
                "user": None,
                "items": items_payload(list(items), [float(s) for s in scores], record.version),
                "version": "live",
                "fallback": False,
            }
        )

    return app


def load_live_recommender(model_dir: str, **options) -> LiveRecommender:
    """The live path over the exported stage-3 model in ``model_dir``.

    Args:
        model_dir: the ``callbacks.LLMExporter`` directory.
        options: keyword arguments of :func:`lightning_modules.live.load_live_recommender` (index, decoding).
    """
    from lightning_modules.live import load_live_recommender as load

    return load(model_dir, **options)


def build_app_from_env() -> FastAPI:
    """uvicorn factory for ``--workers`` > 1: each worker process opens the store named in ``SEMCONV_STORE``."""
    model_dir = os.environ.get("SEMCONV_MODEL") or None
    store = open_store(os.environ["SEMCONV_STORE"])
    options = json.loads(os.environ.get("SEMCONV_LIVE_OPTIONS") or "{}")
    return create_app(store, load_live_recommender(model_dir, **options) if model_dir else None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semconv serve", description="Serve a published top-K cache over HTTP.")
    parser.add_argument("--store", required=True, help="sqlite:///path/recommendations.sqlite or redis://host:port/db")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="exported stage-3 directory: live path + compatibility check")
    parser.add_argument("--index", default=None, help="with --model: a cold-start extension of the model's index")
    parser.add_argument("--num-beams", type=int, default=None, help="with --model: beam width (default: the export's)")
    parser.add_argument(
        "--code-softmax",
        choices=["vocabulary", "trie"],
        default=None,
        help="with --model: the model's code_softmax (default: the export's decoding record)",
    )
    parser.add_argument("--dataset-hash", default=None, help="refuse a cache built for another dataset")
    parser.add_argument("--model-hash", default=None, help="refuse a cache built from another model artifact")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--http", default="auto", help="uvicorn HTTP implementation (auto, h11, httptools)")
    return parser


def serve_main(argv: Sequence[str]) -> int:
    """``semconv serve ...``: check the store, then run uvicorn until interrupted. Returns the exit status."""
    import uvicorn

    args = _parser().parse_args(list(argv))
    try:
        store = open_store(args.store)
        model_hash, dataset_hash = args.model_hash, args.dataset_hash
        if args.model:
            model_hash, dataset_hash = artifact_hashes(args.model)
        record = store.check_compatible(dataset_hash=dataset_hash, model_hash=model_hash)
        options = {
            "index_dir": args.index,
            "num_beams": args.num_beams,
            "renormalize": None if args.code_softmax is None else args.code_softmax == "trie",
        }
        live = load_live_recommender(args.model, **options) if args.model else None
    except SemConvError as err:
        print(f"semconv serve: {err}", file=sys.stderr)
        return 2
    print(
        f"semconv serve: version {record.version} ({record.num_users} users, K={record.k}) on "
        f"http://{args.host}:{args.port}",
        file=sys.stderr,
    )
    common = {
        "host": args.host,
        "port": args.port,
        "access_log": False,
        "log_level": os.environ.get("SEMCONV_LOG_LEVEL", "warning"),
        "http": args.http,
    }
    if args.workers > 1:
        os.environ["SEMCONV_STORE"] = args.store
        os.environ["SEMCONV_MODEL"] = args.model or ""
        os.environ["SEMCONV_LIVE_OPTIONS"] = json.dumps(options)
        store.close()
        # a worker imports the project's packages (torch, Lightning) before it answers: allow it time
        uvicorn.run(
            "lightning_modules.service:build_app_from_env",
            factory=True,
            workers=args.workers,
            timeout_worker_healthcheck=120,
            **common,
        )
    else:
        uvicorn.run(create_app(store, live), **common)
    return 0
