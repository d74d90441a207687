"""Ray for this driver: attach to a cluster (--address or RAY_ADDRESS), or start an embedded local Ray.

The embedded Ray runs with Ray's token authentication on and a token made for this process alone. Ray's GCS,
raylets and workers listen on every interface (Ray 2.60 turns a node address of 127.0.0.1 into the machine's
routable address, so they cannot be held to loopback); without a token, anyone who could reach one of those
ports could join the cluster and run code as this user. With it, a client without the token, or with another,
is refused (tests/integration/test_ray_auth.py). The token is random, lives only in this process's environment
(RAY_AUTH_TOKEN, which Ray reads and hands to the processes it starts, as their environment), and is never
printed, logged, written to a file, the config or MLflow.
"""

from __future__ import annotations

import os
import secrets

from orchestrator.console import RAY_LOG_LEVEL

EMBEDDED_TOKEN_BYTES = 32  # 256 random bits, URL-safe text


def use_fresh_token() -> None:
    """Token authentication on, with a new random token, for the Ray this process is about to start (and the
    processes that Ray starts: they inherit this environment). A token or mode inherited from the shell (a
    remote cluster's) is replaced: an embedded Ray is reachable by its own driver alone."""
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_urlsafe(EMBEDDED_TOKEN_BYTES)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    # Ray caches the mode and the token in this process once anything has read its config (importing Ray Train
    # does): re-read both from the environment, as Ray's own ray.init does when it turns authentication on.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def connect_ray(address: str | None, num_cpus: int | None = None, quiet: bool = False) -> None:
    """Attach to `address` (or RAY_ADDRESS), else start an embedded local Ray for this process. `quiet`: the
    driver's `ray` loggers show errors only (the CLI without --verbose; see orchestrator.console)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True, **({"logging_level": RAY_LOG_LEVEL} if quiet else {}))
        except ConnectionError as err:
            # A cluster with token authentication ignores a driver without its token: Ray then reports only
            # that it could not connect.
            raise ConnectionError(f"{err}. If the cluster uses token authentication, set RAY_AUTH_MODE=token and "
                                  "RAY_AUTH_TOKEN to its token (`ray get-auth-token` on the head node prints it)") from None
    else:
        use_fresh_token()
        # The dashboard serves the State API that Ray Train's placement-group cleaner polls; on loopback only.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                 configure_logging=True, logging_level=RAY_LOG_LEVEL if quiet else "WARNING")
