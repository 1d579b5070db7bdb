"""The Ray that ``kinfonce tune`` runs on: a cluster it joins, or one it starts on this machine.

A Ray started here listens on the loopback interface only. A reachable Ray cluster runs any
job sent to it, and Ray 2.60 binds its servers to the machine's network address even when
asked for 127.0.0.1 (``ray.init(_node_ip_address=...)`` maps a loopback address to the
network one), unless Ray's ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` says that this Ray
serves this machine only. That setting is given to Ray's processes through the environment
and to this process, which may have imported Ray before, through the constant it sets; the
Ray's address is checked after the start.

A Ray started here is also watched by :mod:`kinfonce.raywatch`, which ends it when this
process dies. Joining a cluster (``address``) changes neither; a cluster's failure to
authenticate this process is one line that says what to do.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from kinfonce.errors import KinfonceError
from kinfonce.scoped import environment

#: Ray's setting (an environment variable) that keeps a Ray on the loopback interface.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(address: str) -> bool:
    """Whether an IP address (IPv4, IPv6, or IPv4 mapped into IPv6) is a loopback one."""
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Ray for a search: joined at ``address``, or started here on the loopback interface
    (no dashboard), watched, and shut down after. A Ray already initialised in this process
    is used as it is.

    Raises:
        KinfonceError: the cluster at ``address`` refuses this process or does not answer,
            or the Ray started here is not on the loopback interface.
    """
    import ray

    # Tune snapshots the experiment state at every trial checkpoint (what lets --resume lose
    # nothing) and warns about it when epochs are short; the warning is noise here.
    with environment(TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S="0"):
        if ray.is_initialized():
            yield
            return
        if address is not None:
            join_cluster(address)
            try:
                yield
            finally:
                ray.shutdown()
            return
        with local_ray(num_cpus):
            yield


def join_cluster(address: str) -> None:
    """``ray.init(address=...)``, its refusals as one line.

    Raises:
        KinfonceError: the cluster wants an authentication token this process lacks, or
            nothing answers at ``address``: one line saying what to do.
    """
    import ray
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (AuthenticationError, ConnectionError) as err:
        # Ray 2.60 reports a refused token as AuthenticationError, or (after its retries, the
        # refusals logged as InvalidAuthToken) as a ConnectionError like an absent cluster.
        text = str(getattr(err, "message", err)).strip()
        reason = (text.splitlines() or [type(err).__name__])[0]
        raise KinfonceError(
            f"cannot join the Ray cluster at --address {address} ({reason}): either it asks "
            "for an authentication token that this process lacks (Ray then logs "
            "InvalidAuthToken), or no cluster answers there. On the cluster's head node, pass "
            "--address auto; elsewhere, set RAY_AUTH_MODE=token and the cluster's token "
            "(RAY_AUTH_TOKEN, or its token file) before kinfonce tune; or leave --address "
            "out to start Ray here"
        ) from None


@contextlib.contextmanager
def local_ray(num_cpus: int | None) -> Iterator[None]:
    """A Ray on this machine's loopback interface for the block, with its watchdog.

    Raises:
        KinfonceError: Ray came up on another address (then it is shut down first).
    """
    import psutil
    import ray
    import ray._private.ray_constants as ray_constants

    before = {child.pid for child in psutil.Process().children()}
    enabled = ray_constants.ENABLE_RAY_CLUSTER
    with environment(**{LOCAL_ONLY_ENV: "0"}):
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
                _node_ip_address="127.0.0.1",
            )
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = enabled
    roots = [child.pid for child in psutil.Process().children() if child.pid not in before]
    watchdog = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("raywatch.py")), *map(str, roots)],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        node = ray.util.get_node_ip_address()
        if not is_loopback(node):
            raise KinfonceError(
                f"the Ray started here came up on {node}, not on the loopback interface: "
                f"set {LOCAL_ONLY_ENV}=0 before kinfonce tune, or start a cluster yourself "
                "(docs/tune.md) and pass --address"
            )
        yield
    finally:
        ray.shutdown()
        watchdog.stdin.close()  # end-of-file: the watchdog ends what shutdown left
        watchdog.wait(timeout=30)
