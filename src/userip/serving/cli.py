"""``userip serve``: score (user, item) pairs over HTTP with a trained CTR model and the feature bank.

userip serve --run-dir runs/demo --port 8000                  # RUN/ctr/dcn+profiles + RUN/bank
userip serve --run-dir runs/demo --bank redis://127.0.0.1:6379/0
userip serve --run-dir runs/demo --publish-to-redis redis://127.0.0.1:6379/0   # copy RUN/bank, exit
USERIP_ADMIN_TOKEN=... userip serve --run-dir runs/demo --host 0.0.0.0   # beyond loopback: token required
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import stat
from pathlib import Path

from userip.utils.config import ConfigError, add_set_argument, from_dict, load_yaml, merge_cli_values, to_dict
from userip.utils.logging import get_logger, setup_logging
from userip.utils.run_layout import RunLayout

log = get_logger(__name__)

MIN_TOKEN_LENGTH = 16


class PublishError(RuntimeError):
    """``--publish-to-redis`` failed; the message names the URL and the cause."""


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
    add_set_argument(parser, "timeout_request_s=2.5 (ServeConfig keys, as in --config)")
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
    parser.add_argument("--max-connections", type=int, help="open connections; more are closed on accept")
    parser.add_argument(
        "--timeout-request-s", type=float, help="seconds a client has to send a whole request (default 10)"
    )
    parser.add_argument("--timeout-keep-alive", type=int, help="seconds an idle keep-alive connection stays")
    parser.add_argument(
        "--admin-token-file",
        help="file holding the bearer token of /v1/admin/reload (default: $USERIP_ADMIN_TOKEN); "
        "required when --host is not a loopback address. The token itself is never a flag.",
    )
    parser.add_argument(
        "--publish-to-redis",
        metavar="URL",
        help="copy the file bank (--bank or RUN/bank) into Redis as its current version, then exit",
    )


def build_config(args: argparse.Namespace):  # -> ServeConfig
    from userip.serving.config import ServeConfig

    data = load_yaml(args.config) if args.config else {}
    data = dict(data.get("serve", data))  # accept a full experiment config with a serve: section
    # Every ServeConfig key that has a flag of the same name (``--max-body-bytes`` -> max_body_bytes); flags
    # left unset keep the config file's / default value; --set items come last.
    flags = {field.name: getattr(args, field.name, None) for field in dataclasses.fields(ServeConfig)}
    data = merge_cli_values(data, flags, args.set)
    return from_dict(ServeConfig, data, where=str(args.config or "serve"))


def read_admin_token(config) -> str | None:  # noqa: ANN001 - ServeConfig (imported lazily)
    """The admin bearer token: the file ``admin_token_file`` if set, else ``$<admin_token_env>``; None if
    neither. Binding beyond loopback without one is a ``ConfigError``: the reload endpoint would be open to
    the network."""
    from userip.serving.config import is_loopback

    token = None
    if config.admin_token_file:
        path = Path(config.admin_token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"serve.admin_token_file: cannot read the token file ({e})") from e
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("admin token file %s is readable by other users; chmod 600 it", path)
    elif os.environ.get(config.admin_token_env):
        token = os.environ[config.admin_token_env].strip()
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"the admin token must be at least {MIN_TOKEN_LENGTH} characters")
    if token is None and not is_loopback(config.host):
        raise ConfigError(
            f"serve.host {config.host!r} is not a loopback address: /v1/admin/reload needs a bearer token; "
            f"set ${config.admin_token_env} or serve.admin_token_file (--admin-token-file)"
        )
    return token


def run(args: argparse.Namespace) -> int:
    setup_logging(RunLayout(args.run_dir).logs / "serve.log")
    config = build_config(args)
    admin_token = None if args.publish_to_redis else read_admin_token(config)
    if args.publish_to_redis:
        return _publish(args)

    import torch
    import uvicorn

    from userip.serving.app import create_app
    from userip.serving.http import raise_fd_limit, uvicorn_config
    from userip.serving.scorer import Scorer

    torch.set_num_threads(config.num_threads)
    # Missing/incomplete artifacts and an incompatible bank are named errors (userip.cli reports them).
    scorer = Scorer.from_run_dir(
        args.run_dir, model=args.model, bank=args.bank, redis_prefix=args.redis_prefix
    )
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
    app = create_app(scorer, config, admin_token=admin_token)
    fd_limit = raise_fd_limit(config.max_connections)
    if 0 <= fd_limit < config.max_connections:
        log.warning("open-files limit %d is below max_connections %d", fd_limit, config.max_connections)
    uvicorn.Server(uvicorn_config(app, config)).run()
    return 0


def _publish(args: argparse.Namespace) -> int:
    from userip.feature_bank import FeatureBank
    from userip.serving.redis_bank import DEFAULT_PREFIX, publish_bank

    try:
        bank = FeatureBank.load(args.bank or RunLayout(args.run_dir).bank)
        version = publish_bank(bank, args.publish_to_redis, args.redis_prefix or DEFAULT_PREFIX)
    except Exception as e:  # noqa: BLE001 - any failure (Redis unreachable, bad bank) is one named error
        raise PublishError(f"cannot publish the bank to {args.publish_to_redis}: {e}") from e
    log.info("published bank version %s to %s (prefix %s)", version, args.publish_to_redis, args.redis_prefix)
    return 0
