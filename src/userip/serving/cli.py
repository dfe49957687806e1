"""``userip serve``: score (user, item) pairs over HTTP with a trained CTR model and the feature bank.

userip serve --run-dir runs/demo --port 8000                  # RUN/ctr/dcn+profiles + RUN/bank
userip serve --run-dir runs/demo --bank redis://127.0.0.1:6379/0
userip serve --run-dir runs/demo --publish-to-redis redis://127.0.0.1:6379/0   # copy RUN/bank, exit
"""

from __future__ import annotations

import argparse
from pathlib import Path

from userip.utils.config import ConfigError, from_dict, load_yaml, to_dict
from userip.utils.logging import get_logger, setup_logging

log = get_logger(__name__)

# CLI flag -> ServeConfig key (flags left unset keep the config file's / default value).
_LIMIT_FLAGS = (
    "host",
    "port",
    "max_items_per_request",
    "max_batch_pairs",
    "max_body_bytes",
    "max_id_length",
    "limit_concurrency",
    "num_threads",
    "bank_poll_s",
    "log_level",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir", required=True, type=Path, help="run directory holding data/, ctr/, bank/"
    )
    parser.add_argument(
        "--model", help="trained model folder under RUN/ctr (default: dcn+profiles or the only one)"
    )
    parser.add_argument(
        "--bank", help="feature bank: a folder/file path or redis://host:port/db (default RUN/bank)"
    )
    parser.add_argument(
        "--redis-prefix", default=None, help="key prefix of the Redis bank (default userip:bank)"
    )
    parser.add_argument("--config", type=Path, help="YAML file with ServeConfig keys (flags override it)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--max-items-per-request", type=int, help="item IDs per /v1/score request")
    parser.add_argument("--max-batch-pairs", type=int, help="pairs per /v1/score/batch request")
    parser.add_argument("--max-body-bytes", type=int, help="request body size limit")
    parser.add_argument("--max-id-length", type=int, help="characters per raw ID")
    parser.add_argument("--limit-concurrency", type=int, help="concurrent requests before answering 503")
    parser.add_argument("--num-threads", type=int, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--bank-poll-s", type=float, help="reload the bank when its version changes (0 = off)"
    )
    parser.add_argument("--log-level", help="uvicorn log level")
    parser.add_argument(
        "--publish-to-redis",
        metavar="URL",
        help="copy the file bank (--bank or RUN/bank) into Redis as its current version, then exit",
    )


def build_config(args: argparse.Namespace):  # -> ServeConfig
    from userip.serving.config import ServeConfig

    data = load_yaml(args.config) if args.config else {}
    data = dict(data.get("serve", data))  # accept a full experiment config with a serve: section
    for key in _LIMIT_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    return from_dict(ServeConfig, data, where=str(args.config or "serve"))


def run(args: argparse.Namespace) -> int:
    setup_logging(args.run_dir / "logs" / "serve.log")
    try:
        config = build_config(args)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    if args.publish_to_redis:
        return _publish(args)

    import torch
    import uvicorn

    from userip.serving.app import create_app
    from userip.serving.scorer import Scorer

    torch.set_num_threads(config.num_threads)
    try:
        scorer = Scorer.from_run_dir(
            args.run_dir, model=args.model, bank=args.bank, redis_prefix=args.redis_prefix
        )
    except (OSError, ValueError, RuntimeError) as e:  # missing/incomplete artifacts, incompatible bank
        log.error("cannot serve: %s", e)
        return 2
    info = scorer.describe()
    log.info(
        "serving %s (fields %s, bank %s) on http://%s:%d with %s",
        info["model"],
        info["fields"],
        info["bank_version"],
        config.host,
        config.port,
        to_dict(config),
    )
    app = create_app(scorer, config)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        limit_concurrency=config.limit_concurrency,
        access_log=False,  # one log line per request would cost more than scoring it
    )
    return 0


def _publish(args: argparse.Namespace) -> int:
    from userip.feature_bank import FeatureBank
    from userip.serving.redis_bank import DEFAULT_PREFIX, publish_bank

    try:
        bank = FeatureBank.load(args.bank or args.run_dir / "bank")
        version = publish_bank(bank, args.publish_to_redis, args.redis_prefix or DEFAULT_PREFIX)
    except Exception as e:  # noqa: BLE001 - a CLI reports any failure in one line
        log.error("cannot publish the bank to %s: %s", args.publish_to_redis, e)
        return 2
    log.info("published bank version %s to %s (prefix %s)", version, args.publish_to_redis, args.redis_prefix)
    return 0
