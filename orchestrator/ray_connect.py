"""Ray for this driver: attach to a cluster (--address or RAY_ADDRESS), or start an embedded local Ray."""

from __future__ import annotations

import os

from orchestrator.console import RAY_LOG_LEVEL


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
        # Token auth protects a shared cluster; an embedded single-user Ray on loopback has no one to keep out.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # The dashboard serves the State API that Ray Train's placement-group cleaner polls; on loopback only.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                 configure_logging=True, logging_level=RAY_LOG_LEVEL if quiet else "WARNING")
